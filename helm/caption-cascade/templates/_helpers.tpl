{{- define "caption-cascade.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "caption-cascade.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- /* "+" (SemVer build metadata) is not allowed in a label value. */}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "caption-cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The objects of one part of the release; `.component` is "combined" (the one Deployment of
       topology: combined) or generator / ranker / cascade (topology: split). */}}
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

{{- define "caption-cascade.componentLabels" -}}
{{ include "caption-cascade.labels" .root }}
{{- if ne .component "combined" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- /* A component's settings as YAML: split reads .Values.<component>, combined the top-level
       values it has always used. */}}
{{- define "caption-cascade.settings" -}}
{{- $v := .root.Values -}}
{{- if eq .component "combined" -}}
{{- toYaml (dict "replicas" $v.replicaCount "resources" $v.resources "gpus" $v.gpus "nodeSelector" $v.nodeSelector "tolerations" $v.tolerations "affinity" $v.affinity "env" dict) -}}
{{- else -}}
{{- toYaml (index $v .component) -}}
{{- end -}}
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
