{{- /*
The pod template of one component (dict "root" $ "component" NAME): NAME is "combined" (every
service in one process, topology: combined) or generator / ranker / cascade (topology: split).
*/}}
{{- define "caption-cascade.pod" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $component := .component -}}
{{- $split := ne $component "combined" -}}
{{- $s := fromYaml (include "caption-cascade.settings" .) -}}
{{- $models := splitList " " (include "caption-cascade.componentModels" .) | compact -}}
{{- $servingTLS := include "caption-cascade.servingTLS" . -}}
{{- $clientCA := "" -}}
{{- if not (has $component (list "generator" "ranker")) }}{{ $clientCA = $v.tls.clientCASecretName }}{{ end -}}
{{- $token := include "caption-cascade.requiredToken" . -}}
{{- /* The cascade's hop to the generator and ranker (split only). */ -}}
{{- $upstreamTLS := "" -}}
{{- $upstreamToken := "" -}}
{{- if eq $component "cascade" -}}
{{- $upstreamTLS = include "caption-cascade.servingTLS" (dict "root" $root "component" "generator") -}}
{{- $upstreamToken = include "caption-cascade.requiredToken" (dict "root" $root "component" "generator") -}}
{{- if and $upstreamTLS (not $v.upstream.tls.caSecretName) -}}
{{- fail "the generator and ranker serve TLS (tls.secretName or upstream.tls.secretName): set upstream.tls.caSecretName to a Secret whose ca.crt verifies their certificates" -}}
{{- end -}}
{{- end -}}
{{- $modelVolume := and $models (ne $v.models.source "image") -}}
{{- $grace := int $v.terminationGracePeriodSeconds -}}
{{- $preStop := int $v.preStopSleepSeconds -}}
{{- if lt $grace (add $preStop 6) -}}
{{- fail (printf "terminationGracePeriodSeconds must be at least %d: the preStop hook sleeps %d s, then the server drains for what is left less 5 s" (add $preStop 6) $preStop) -}}
{{- end -}}
{{- $labels := fromYaml (include "caption-cascade.componentLabels" .) -}}
{{- range $name, $_ := $s.podLabels -}}
{{- if hasKey $labels $name -}}
{{- fail (printf "podLabels: %s is the chart's own label (app.kubernetes.io/*, helm.sh/chart): the selectors and tools rely on it" $name) -}}
{{- end -}}
{{- end -}}
metadata:
  labels:
    {{- toYaml (merge $labels $s.podLabels) | nindent 4 }}
  {{- with $s.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "caption-cascade.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automount }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $s.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $models (eq $v.models.source "pull") }}
  # Each model folder is pulled from the Hugging Face Hub before the server starts.
  initContainers:
    {{- range $model := $models }}
    {{- $pull := index $v.models.pull $model }}
    - name: pull-{{ $model }}
      image: {{ $s.image | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: ["models", "pull", {{ $pull.repo | quote }}, "--revision", {{ $pull.revision | default "main" | quote }}, "--models-dir", {{ $v.models.mountPath | quote }}]
      env:
        # The hub's download cache, on the models volume (a PVC keeps it across restarts).
        - name: HF_HUB_CACHE
          value: "{{ trimSuffix "/" $v.models.mountPath }}/.hub-cache"
        {{- with $v.models.pull.endpoint }}
        - name: HF_ENDPOINT
          value: {{ . | quote }}
        {{- end }}
        {{- with $v.models.pull.tokenSecretName }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . | quote }}
              key: {{ $v.models.pull.tokenSecretKey | quote }}
        {{- end }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: models
          mountPath: {{ $v.models.mountPath }}
      {{- with $v.models.pull.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
  {{- end }}
  containers:
    - name: caption-cascade
      image: {{ $s.image | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: ["serve"]
      env:
        - name: CAPTION_LISTEN
          value: "0.0.0.0:{{ $v.port }}"
        {{- if $split }}
        # Which services this process serves; it loads only the models they need.
        - name: CAPTION_SERVICES
          value: {{ $component }}
        {{- end }}
        {{- if has "blip" $models }}
        - name: CAPTION_BLIP_MODEL
          value: {{ include "caption-cascade.modelPath" (dict "root" $root "model" "blip") | quote }}
        {{- end }}
        {{- if has "clip" $models }}
        - name: CAPTION_CLIP_MODEL
          value: {{ include "caption-cascade.modelPath" (dict "root" $root "model" "clip") | quote }}
        {{- end }}
        - name: CAPTION_DEVICE
          value: {{ $s.device | quote }}
        - name: CAPTION_HEALTH_LISTEN
          value: "0.0.0.0:{{ $v.healthPort }}"
        - name: CAPTION_DRAIN_TIMEOUT_S
          value: "{{ sub (sub $grace $preStop) 5 }}"
        - name: CAPTION_METRICS_LISTEN
          value: "0.0.0.0:{{ $v.metrics.port }}"
        {{- if and (gt (int64 $v.resultCache.bytes) 0) (has $component (list "combined" "cascade")) }}
        # Caption answers kept by this pod (the pods that answer Caption).
        - name: CAPTION_RESULT_CACHE_BYTES
          value: {{ int64 $v.resultCache.bytes | quote }}
        - name: CAPTION_RESULT_CACHE_TTL_S
          value: {{ int64 $v.resultCache.ttlSeconds | quote }}
        {{- end }}
        {{- if eq $component "cascade" }}
        {{- $scheme := ternary "https" "http" (ne $upstreamTLS "") }}
        # Headless Services: the names resolve to every ready pod, balanced client-side.
        - name: CAPTION_GENERATOR_ENDPOINT
          value: "{{ $scheme }}://{{ include "caption-cascade.componentName" (dict "root" $root "component" "generator") }}:{{ $v.port }}"
        - name: CAPTION_RANKER_ENDPOINT
          value: "{{ $scheme }}://{{ include "caption-cascade.componentName" (dict "root" $root "component" "ranker") }}:{{ $v.port }}"
        {{- if $upstreamTLS }}
        - name: CAPTION_UPSTREAM_CA
          value: /etc/caption/upstream-ca/ca.crt
        {{- end }}
        {{- if $upstreamToken }}
        - name: CAPTION_UPSTREAM_TOKEN_FILE
          value: /etc/caption/upstream-token/token
        {{- end }}
        {{- end }}
        {{- if $servingTLS }}
        - name: CAPTION_TLS_CERT
          value: /etc/caption/tls/tls.crt
        - name: CAPTION_TLS_KEY
          value: /etc/caption/tls/tls.key
        {{- end }}
        {{- if $v.tls.clientCASecretName }}
        {{- if not $v.tls.secretName }}
        {{- fail "tls.clientCASecretName needs tls.secretName: mutual TLS is TLS first" }}
        {{- end }}
        {{- end }}
        {{- if $clientCA }}
        - name: CAPTION_TLS_CLIENT_CA
          value: /etc/caption/client-ca/ca.crt
        {{- end }}
        {{- if $token }}
        # A file, not an environment variable: the kubelet updates a mounted Secret's files and the
        # server reads the file again when it changes, so a rotated token needs no restart.
        - name: CAPTION_AUTH_TOKEN_FILE
          value: /etc/caption/auth-token/token
        {{- end }}
        {{- if not $v.reflection }}
        - name: CAPTION_NO_REFLECTION
          value: "true"
        {{- end }}
        {{- /* A second entry with one of these names would be a duplicate (the last one wins,
               server-side apply may refuse it) and CAPTION_LISTEN would move the server away
               from the probes' port, so point at the value to use instead. */}}
        {{- $own := dict "CAPTION_LISTEN" "port" "CAPTION_HEALTH_LISTEN" "healthPort" "CAPTION_BLIP_MODEL" "models.blip" "CAPTION_CLIP_MODEL" "models.clip" "CAPTION_DEVICE" "device" "CAPTION_DRAIN_TIMEOUT_S" "terminationGracePeriodSeconds" "CAPTION_TLS_CERT" "tls.secretName" "CAPTION_TLS_KEY" "tls.secretName" "CAPTION_TLS_CLIENT_CA" "tls.clientCASecretName" "CAPTION_AUTH_TOKEN" "auth.tokenSecretName" "CAPTION_AUTH_TOKEN_FILE" "auth.tokenSecretName" "CAPTION_NO_REFLECTION" "reflection" "CAPTION_METRICS_LISTEN" "metrics.port" "CAPTION_SERVICES" "topology" "CAPTION_GENERATOR_ENDPOINT" "topology" "CAPTION_RANKER_ENDPOINT" "topology" "CAPTION_UPSTREAM_CA" "upstream.tls.caSecretName" "CAPTION_UPSTREAM_TOKEN_FILE" "upstream.token.secretName" "CAPTION_RESULT_CACHE_BYTES" "resultCache.bytes" "CAPTION_RESULT_CACHE_TTL_S" "resultCache.ttlSeconds" }}
        {{- $named := dict }}
        {{- range $name, $value := $s.env }}
        {{- if hasKey $own $name }}
        {{- fail (printf "env.%s is set by the chart: use the value %s instead" $name (get $own $name)) }}
        {{- end }}
        {{- $_ := set $named $name "env" }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- range $s.extraEnv }}
        {{- if hasKey $own .name }}
        {{- fail (printf "extraEnv %s is set by the chart: use the value %s instead" .name (get $own .name)) }}
        {{- end }}
        {{- if hasKey $named .name }}
        {{- fail (printf "extraEnv %s is set twice (env and extraEnv, or twice in extraEnv): the last would silently win" .name) }}
        {{- end }}
        {{- $_ := set $named .name "extraEnv" }}
        - {{- toYaml . | nindent 10 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $v.port }}
          protocol: TCP
        - name: health
          containerPort: {{ $v.healthPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $v.metrics.port }}
          protocol: TCP
      {{- if $preStop }}
      # Endpoints (Service, headless DNS) drop the pod while it still serves; SIGTERM and the
      # server's drain come after this sleep.
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ $preStop }}"]
      {{- end }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $modelVolume }}
        - name: models
          mountPath: {{ $v.models.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $servingTLS }}
        - name: tls
          mountPath: /etc/caption/tls
          readOnly: true
        {{- end }}
        {{- if $clientCA }}
        - name: client-ca
          mountPath: /etc/caption/client-ca
          readOnly: true
        {{- end }}
        {{- if $upstreamTLS }}
        - name: upstream-ca
          mountPath: /etc/caption/upstream-ca
          readOnly: true
        {{- end }}
        {{- if $token }}
        # The whole volume, never a subPath: files mounted by subPath are not updated.
        - name: auth-token
          mountPath: /etc/caption/auth-token
          readOnly: true
        {{- end }}
        {{- if $upstreamToken }}
        - name: upstream-token
          mountPath: /etc/caption/upstream-token
          readOnly: true
        {{- end }}
        {{- with $s.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $service := get (dict "combined" "caption.v1.Cascade" "generator" "caption.v1.Generator" "ranker" "caption.v1.Ranker" "cascade" "caption.v1.Cascade") $component }}
      {{- if eq $component "cascade" }}
      # The probes use the health port: they speak neither TLS nor bearer tokens. The cascade's
      # gRPC health follows its upstreams (SERVING only while the generator and ranker each have a
      # SERVING pod): readiness uses it, but starting and staying alive must not, or an outage of
      # the generators would restart every cascade pod, so those only check the port is open.
      startupProbe:
        tcpSocket:
          port: {{ $v.healthPort }}
        periodSeconds: 2
        failureThreshold: 30
      readinessProbe:
        grpc:
          port: {{ $v.healthPort }}
          service: {{ $service }}
        periodSeconds: 5
      livenessProbe:
        tcpSocket:
          port: {{ $v.healthPort }}
        periodSeconds: 10
        failureThreshold: 6
      {{- else }}
      # Models load and warm up before the ports open; the gRPC health check then says SERVING.
      # The probes use the health port: they speak neither TLS nor bearer tokens.
      startupProbe:
        grpc:
          port: {{ $v.healthPort }}
          service: {{ $service }}
        periodSeconds: 5
        failureThreshold: 60
      readinessProbe:
        grpc:
          port: {{ $v.healthPort }}
          service: {{ $service }}
        periodSeconds: 5
      livenessProbe:
        grpc:
          port: {{ $v.healthPort }}
        periodSeconds: 10
        failureThreshold: 6
      {{- end }}
      resources:
        {{- toYaml $s.resources | nindent 8 }}
  volumes:
    # The root filesystem is read-only; /tmp is the one scratch folder.
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.tmpSizeLimit }}
    {{- if $modelVolume }}
    - name: models
      {{- if $v.models.pvc.claimName }}
      persistentVolumeClaim:
        claimName: {{ $v.models.pvc.claimName | quote }}
        {{- if eq $v.models.source "pvc" }}
        readOnly: true
        {{- end }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $v.models.pull.sizeLimit }}
      {{- end }}
    {{- end }}
    {{- if $servingTLS }}
    - name: tls
      secret:
        secretName: {{ $servingTLS | quote }}
    {{- end }}
    {{- if $clientCA }}
    - name: client-ca
      secret:
        secretName: {{ $clientCA | quote }}
    {{- end }}
    {{- if $upstreamTLS }}
    - name: upstream-ca
      secret:
        secretName: {{ $v.upstream.tls.caSecretName | quote }}
        items:
          - key: ca.crt
            path: ca.crt
    {{- end }}
    {{- if $token }}
    - name: auth-token
      secret:
        secretName: {{ index (splitList "/" $token) 0 | quote }}
        items:
          - key: {{ index (splitList "/" $token) 1 | quote }}
            path: token
    {{- end }}
    {{- if $upstreamToken }}
    - name: upstream-token
      secret:
        secretName: {{ index (splitList "/" $upstreamToken) 0 | quote }}
        items:
          - key: {{ index (splitList "/" $upstreamToken) 1 | quote }}
            path: token
    {{- end }}
    {{- range $s.extraVolumes }}
    {{- if has .name (list "tmp" "models" "tls" "client-ca" "upstream-ca" "auth-token" "upstream-token") }}
    {{- fail (printf "extraVolumes: the chart names a volume %s itself: choose another name" .name) }}
    {{- end }}
    - {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- with $s.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.topologySpread }}
  # Spread this component's pods; pod-template-hash limits the count to the current rollout.
  topologySpreadConstraints:
    {{- range . }}
    - maxSkew: {{ .maxSkew | default 1 }}
      topologyKey: {{ .topologyKey }}
      whenUnsatisfiable: {{ .whenUnsatisfiable | default "ScheduleAnyway" }}
      labelSelector:
        matchLabels:
          {{- include "caption-cascade.componentSelectorLabels" $ | nindent 10 }}
      matchLabelKeys: ["pod-template-hash"]
    {{- end }}
  {{- end }}
{{- end -}}
