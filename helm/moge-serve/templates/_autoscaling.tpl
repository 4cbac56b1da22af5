{{/*
HorizontalPodAutoscaler and PodDisruptionBudget of a Deployment. Call with
(dict "root" $ "name" NAME "component" COMPONENT "values" COMPONENT_VALUES).
*/}}
{{- define "moge-serve.autoscaling" -}}
{{- $labelArgs := dict "root" .root "component" .component }}
{{- $autoscaling := .values.autoscaling }}
{{- if $autoscaling.enabled }}
{{- if gt (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is greater than maxReplicas (%d)" .component (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas)) }}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "moge-serve.labels" $labelArgs | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  minReplicas: {{ $autoscaling.minReplicas }}
  maxReplicas: {{ $autoscaling.maxReplicas }}
  {{- if or $autoscaling.targetCPUUtilizationPercentage $autoscaling.metrics }}
  metrics:
    {{- with $autoscaling.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $autoscaling.metrics }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $autoscaling.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if .values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "moge-serve.labels" $labelArgs | nindent 4 }}
spec:
  maxUnavailable: {{ .values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "moge-serve.selectorLabels" $labelArgs | nindent 6 }}
{{- end }}
{{- end }}
