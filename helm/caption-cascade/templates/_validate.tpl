{{- /* Value combinations the schema cannot refuse; fails the render with what to set. */}}
{{- define "caption-cascade.validate" -}}
{{- $v := .Values -}}
{{- $m := $v.models -}}
{{- if eq $m.source "pvc" -}}
{{- if not $m.pvc.claimName -}}
{{- fail "models.source pvc needs models.pvc.claimName: the PersistentVolumeClaim holding the model folders" -}}
{{- end -}}
{{- range $model := list "blip" "clip" -}}
{{- $path := index $m $model -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $path) -}}
{{- fail (printf "models.%s %q is not under models.mountPath %q, where the PVC is mounted" $model $path $m.mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq $v.topology "split" -}}
{{- range $component := list "generator" "ranker" "cascade" -}}
{{- $s := index $v $component -}}
{{- $a := $s.autoscaling -}}
{{- if $a.enabled -}}
{{- if lt (int $a.maxReplicas) (int $a.minReplicas) -}}
{{- fail (printf "%s.autoscaling.maxReplicas (%d) is below minReplicas (%d)" $component (int $a.maxReplicas) (int $a.minReplicas)) -}}
{{- end -}}
{{- if not (dig "requests" "cpu" "" ($s.resources | default dict)) -}}
{{- fail (printf "%s.autoscaling scales on CPU utilization, a share of the CPU request: set %s.resources.requests.cpu" $component $component) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
