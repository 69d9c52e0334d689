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
{{- range $component := splitList " " (include "caption-cascade.tiers" .) -}}
{{- $s := fromYaml (include "caption-cascade.settings" (dict "root" $ "component" $component)) -}}
{{- $key := ternary "" (printf "%s." $component) (eq $component "combined") -}}
{{- $a := $s.autoscaling -}}
{{- if $a.enabled -}}
{{- if lt (int $a.maxReplicas) (int $a.minReplicas) -}}
{{- fail (printf "%sautoscaling.maxReplicas (%d) is below minReplicas (%d)" $key (int $a.maxReplicas) (int $a.minReplicas)) -}}
{{- end -}}
{{- if not (dig "requests" "cpu" "" ($s.resources | default dict)) -}}
{{- fail (printf "%sautoscaling scales on CPU utilization, a share of the CPU request: set %sresources.requests.cpu" $key $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The global device goes to the split tiers that get a GPU; cuda with none would quietly run
       everything on the CPU. */ -}}
{{- if and (eq $v.topology "split") (eq $v.device "cuda") -}}
{{- if not (or (gt (int $v.generator.gpus) 0) (gt (int $v.ranker.gpus) 0)) -}}
{{- fail "device is cuda, which applies to the tiers that get a GPU, and none does: set generator.gpus (and ranker.gpus), or a tier's own device" -}}
{{- end -}}
{{- end -}}
{{- end -}}
