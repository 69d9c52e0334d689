{{- /* The chart's name as objects and labels carry it: nameOverride or the chart's. */}}
{{- define "caption-cascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "caption-cascade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "caption-cascade.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Kubernetes' recommended labels and helm.sh/chart, less the component: every object's. */}}
{{- define "caption-cascade.labels" -}}
{{- /* "+" (SemVer build metadata) is not allowed in a label value. */ -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "caption-cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: {{ include "caption-cascade.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- /* The selector every earlier release used: it may never change (tests/helm/selectors.golden.json). */}}
{{- define "caption-cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "caption-cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The objects of one part of the release; `.component` is "combined" (the one Deployment of
       topology: combined), generator / ranker / cascade (topology: split), or a part that runs
       no server (metrics, test). */}}
{{- define "caption-cascade.componentName" -}}
{{- if eq .component "combined" -}}
{{- include "caption-cascade.fullname" .root -}}
{{- else -}}
{{- $suffix := printf "-%s" .component -}}
{{- printf "%s%s" (include "caption-cascade.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}
{{- end -}}

{{- /* Selector labels of a component's pods. Combined keeps the chart's original selector (a
       Deployment's selector cannot change on upgrade); split adds the component. */}}
{{- define "caption-cascade.componentSelectorLabels" -}}
{{ include "caption-cascade.selectorLabels" .root }}
{{- if ne .component "combined" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- /* Every label of a component's objects and pods: the recommended ones with its component,
       which the combined pods carry too (outside their selector). */}}
{{- define "caption-cascade.componentLabels" -}}
{{ include "caption-cascade.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- /* The service account the server pods run as. */}}
{{- define "caption-cascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "caption-cascade.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* A server tier's settings as YAML, every inherited value resolved: split reads
       .Values.<component> over the values every pod gets, combined the top-level values. The one
       place that decides a tier's device, GPUs, image and scaling, and refuses what cannot run:
       cuda without a GPU, cuda on the cpu image. */}}
{{- define "caption-cascade.settings" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $component := .component -}}
{{- $own := dict -}}
{{- $key := "" -}}
{{- if eq $component "combined" -}}
{{- /* replicaCount: the count's name before 0.2; set, it still wins. */ -}}
{{- $replicas := $v.replicas -}}
{{- if not (kindIs "invalid" $v.replicaCount) }}{{ $replicas = $v.replicaCount }}{{ end -}}
{{- $own = dict "replicas" $replicas "device" $v.device "gpus" $v.gpus "resources" $v.resources "nodeSelector" $v.nodeSelector "tolerations" $v.tolerations "affinity" $v.affinity "autoscaling" $v.autoscaling "podDisruptionBudget" $v.podDisruptionBudget "topologySpread" $v.topologySpread -}}
{{- else -}}
{{- $own = index $v $component -}}
{{- $key = printf "%s." $component -}}
{{- end -}}
{{- $gpus := int ($own.gpus | default 0) -}}
{{- $device := "cpu" -}}
{{- if $own.device -}}
{{- $device = $own.device -}}
{{- else if gt $gpus 0 -}}
{{- $device = $v.device -}}
{{- end -}}
{{- if and (eq $device "cuda") (eq $gpus 0) -}}
{{- fail (printf "%sdevice is cuda but %sgpus is 0: its pods would get no GPU and refuse to start; set %sgpus (the %s resource), or device auto or cpu" $key $key $key ($own.gpuResource | default $v.gpuResource)) -}}
{{- end -}}
{{- $image := $own.image | default dict -}}
{{- $variant := $image.variant | default $v.image.variant -}}
{{- if eq $variant "auto" -}}
{{- $variant = ternary "cuda" "cpu" (and (gt $gpus 0) (ne $device "cpu")) -}}
{{- end -}}
{{- if and (eq $device "cuda") (eq $variant "cpu") -}}
{{- fail (printf "%sdevice is cuda but its image variant is cpu, which holds no CUDA libraries: set %simage.variant cuda (or auto)" $key $key) -}}
{{- end -}}
{{- $tag := toString ($image.tag | default $v.image.tag | default $root.Chart.AppVersion) -}}
{{- if eq $variant "cuda" }}{{ $tag = printf "%s%s" $tag $v.image.cudaTagSuffix }}{{ end -}}
{{- $gpuResource := $own.gpuResource | default $v.gpuResource -}}
{{- /* `--set resources=null` removes the key; deepCopy of nothing would fail. */ -}}
{{- $resources := deepCopy ($own.resources | default dict) -}}
{{- if gt $gpus 0 -}}
{{- $limits := default dict $resources.limits -}}
{{- $_ := set $limits $gpuResource $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- $split := ne $component "combined" -}}
{{- $tier := dict
    "replicas" $own.replicas
    "device" $device
    "gpus" $gpus
    "gpuResource" $gpuResource
    "variant" $variant
    "image" (printf "%s:%s" ($image.repository | default $v.image.repository) $tag)
    "resources" $resources
    "nodeSelector" $own.nodeSelector
    "tolerations" $own.tolerations
    "affinity" $own.affinity
    "runtimeClassName" (ternary ($own.runtimeClassName | default $v.runtimeClassName) $v.runtimeClassName $split)
    "priorityClassName" (ternary ($own.priorityClassName | default $v.priorityClassName) $v.priorityClassName $split)
    "podAnnotations" (merge (deepCopy (ternary ($own.podAnnotations | default dict) dict $split)) (deepCopy ($v.podAnnotations | default dict)))
    "podLabels" (merge (deepCopy (ternary ($own.podLabels | default dict) dict $split)) (deepCopy ($v.podLabels | default dict)))
    "env" (merge (deepCopy (ternary ($own.env | default dict) dict $split)) (deepCopy ($v.env | default dict)))
    "extraEnv" (concat ($v.extraEnv | default list) (ternary ($own.extraEnv | default list) list $split))
    "extraVolumes" (concat ($v.extraVolumes | default list) (ternary ($own.extraVolumes | default list) list $split))
    "extraVolumeMounts" (concat ($v.extraVolumeMounts | default list) (ternary ($own.extraVolumeMounts | default list) list $split))
    "serviceAnnotations" (ternary ($own.serviceAnnotations | default dict) $v.service.annotations $split)
    "autoscaling" $own.autoscaling
    "podDisruptionBudget" $own.podDisruptionBudget
    "topologySpread" $own.topologySpread
-}}
{{- toYaml $tier -}}
{{- end -}}

{{- /* The server tiers of the release's topology. */}}
{{- define "caption-cascade.tiers" -}}
{{- ternary "combined" "generator ranker cascade" (eq .Values.topology "combined") -}}
{{- end -}}

{{- /* The models a component loads, space-separated: blip (BLIP, the generator), clip (CLIP, the
       ranker). */}}
{{- define "caption-cascade.componentModels" -}}
{{- $models := dict "combined" "blip clip" "generator" "blip" "ranker" "clip" "cascade" "" -}}
{{- get $models .component -}}
{{- end -}}

{{- /* Where the server finds a model folder (.model: blip or clip). models.source pull writes it
       to <models.mountPath>/<repository name>, as `caption-cascade models pull` does. */}}
{{- define "caption-cascade.modelPath" -}}
{{- $m := .root.Values.models -}}
{{- if eq $m.source "pull" -}}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (last (splitList "/" (index $m.pull .model).repo)) -}}
{{- else -}}
{{- index $m .model -}}
{{- end -}}
{{- end -}}

{{- /* The TLS Secret a component serves with: the callers' tls.secretName for combined and the
       cascade, upstream.tls.secretName (default the same) for the generator and ranker. */}}
{{- define "caption-cascade.servingTLS" -}}
{{- $v := .root.Values -}}
{{- if has .component (list "generator" "ranker") -}}
{{- $v.upstream.tls.secretName | default $v.tls.secretName -}}
{{- else -}}
{{- $v.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- /* The token a component requires, as "secret/key" ("" for none): auth.* for callers of
       combined and the cascade, upstream.token.* (default auth.*) for the generator and ranker. */}}
{{- define "caption-cascade.requiredToken" -}}
{{- $v := .root.Values -}}
{{- if and (has .component (list "generator" "ranker")) $v.upstream.token.secretName -}}
{{- printf "%s/%s" $v.upstream.token.secretName $v.upstream.token.secretKey -}}
{{- else if $v.auth.tokenSecretName -}}
{{- printf "%s/%s" $v.auth.tokenSecretName $v.auth.tokenSecretKey -}}
{{- end -}}
{{- end -}}
