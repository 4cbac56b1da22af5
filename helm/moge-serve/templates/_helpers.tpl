{{/*
Chart name, at most 63 characters.
*/}}
{{- define "moge-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name. It is cut to 38 characters because a
StatefulSet name may have at most 52 (its pods get a 63-character
controller-revision-hash label) and "-shared-expert" adds 14.
*/}}
{{- define "moge-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 38 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 38 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 38 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moge-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the pods of one component. Call with (dict "root" $ "component" NAME "group" INDEX);
group is set only for expert groups.
*/}}
{{- define "moge-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moge-serve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if hasKey . "group" }}
moge-serve/group: {{ .group | quote }}
{{- end }}
{{- end }}

{{/*
Labels of every resource; same argument as moge-serve.selectorLabels.
*/}}
{{- define "moge-serve.labels" -}}
helm.sh/chart: {{ include "moge-serve.chart" .root }}
{{ include "moge-serve.selectorLabels" . }}
app.kubernetes.io/part-of: moge-serve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/*
Labels of resources that belong to no single component.
*/}}
{{- define "moge-serve.commonLabels" -}}
helm.sh/chart: {{ include "moge-serve.chart" . }}
app.kubernetes.io/name: {{ include "moge-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: moge-serve
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moge-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moge-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moge-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Expert workloads: every group in order, then the shared expert. Returns
JSON {"items": [...]}; each item has name, component, group (absent for
the shared expert), service (gRPC health service name) and settings
(expertDefaults with the entry's keys replacing the defaults' keys).
*/}}
{{- define "moge-serve.experts" -}}
{{- $fullname := include "moge-serve.fullname" . }}
{{- $items := list }}
{{- range $index, $entry := .Values.expertGroups }}
{{- $settings := deepCopy $.Values.expertDefaults }}
{{- range $key, $value := $entry }}
{{- $_ := set $settings $key $value }}
{{- end }}
{{- $items = append $items (dict "name" (printf "%s-group-%d" $fullname $index) "component" "expert-group" "group" $index "settings" $settings) }}
{{- end }}
{{- $settings := deepCopy .Values.expertDefaults }}
{{- range $key, $value := .Values.sharedExpert }}
{{- $_ := set $settings $key $value }}
{{- end }}
{{- $items = append $items (dict "name" (printf "%s-shared-expert" $fullname) "component" "shared-expert" "settings" $settings) }}
{{- toJson (dict "items" $items) }}
{{- end }}

{{/*
URL scheme of the gRPC connections between services.
*/}}
{{- define "moge-serve.scheme" -}}
{{- if .Values.tls.secretName }}https{{ else }}http{{ end }}
{{- end }}

{{/*
Address of every replica of one expert workload, comma-separated: each pod
of a StatefulSet has a DNS name under its headless Service. Call with
(dict "root" $ "item" ITEM).
*/}}
{{- define "moge-serve.replicaURLs" -}}
{{- $root := .root }}
{{- $urls := list }}
{{- range $replica := until (int .item.settings.replicas) }}
{{- $host := printf "%s-%d.%s.%s.svc.%s" $.item.name $replica $.item.name $root.Release.Namespace $root.Values.clusterDomain }}
{{- $urls = append $urls (printf "%s://%s:%d" (include "moge-serve.scheme" $root) $host (int $root.Values.ports.grpc)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/*
Pod security context shared by every pod.
*/}}
{{- define "moge-serve.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.securityContext.fsGroup }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container security context shared by every container.
*/}}
{{- define "moge-serve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Startup, liveness and readiness probes of a container. Call with
(dict "root" $ "service" HEALTH_SERVICE "tls" BOOL "probes" TIMINGS).
Without TLS they are native gRPC probes against grpc.health.v1: startup and
readiness check the component's own service, which turns NOT_SERVING when
the process starts draining. Liveness checks the overall server health "",
which stays SERVING during the drain, so that the kubelet does not restart
a draining pod. The kubelet's gRPC probe cannot speak TLS, so with TLS on
the port every probe is a TCP connect.
*/}}
{{- define "moge-serve.probes" -}}
{{- $port := int .root.Values.ports.grpc }}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{ $kind }}Probe:
  {{- if $.tls }}
  tcpSocket:
    port: grpc
  {{- else }}
  grpc:
    port: {{ $port }}
    {{- if ne $kind "liveness" }}
    service: {{ $.service }}
    {{- end }}
  {{- end }}
  {{- $timing := get $.probes $kind }}
  periodSeconds: {{ $timing.periodSeconds }}
  failureThreshold: {{ $timing.failureThreshold }}
  timeoutSeconds: {{ $timing.timeoutSeconds }}
{{- end }}
{{- end }}

{{/*
Seconds Kubernetes waits between the start of a pod's deletion and SIGKILL:
the preStop sleep, the drain and a margin. Call with (dict "root" $ "drains" N):
the gateway drains its gRPC server first and then gives the HTTP server up
to another drain timeout, so it passes 2.
*/}}
{{- define "moge-serve.terminationGracePeriodSeconds" -}}
{{- $service := .root.Values.service }}
{{- add (int $service.preStopSleepSeconds) (mul (int .drains) (int $service.drainTimeoutSeconds)) (int $service.terminationGraceMarginSeconds) }}
{{- end }}

{{- define "moge-serve.lifecycle" -}}
{{- with .Values.service.preStopSleepSeconds }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ . }}
{{- end }}
{{- end }}

{{/*
Settings every service reads from its TOML file, as a dict of TOML keys.
*/}}
{{- define "moge-serve.serverSettings" -}}
{{- $settings := dict "host" "0.0.0.0" "grpc_port" (int .Values.ports.grpc) "max_message_bytes" (int64 .Values.service.maxMessageBytes) "drain_timeout_seconds" (int .Values.service.drainTimeoutSeconds) }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $settings "metrics_port" (int .Values.ports.metrics) }}
{{- else }}
{{- $_ := set $settings "disable_metrics" true }}
{{- end }}
{{- with .Values.telemetry.otlpEndpoint }}
{{- $_ := set $settings "otlp_endpoint" . }}
{{- end }}
{{- toJson $settings }}
{{- end }}

{{/*
Renders a dict as a TOML document, keys sorted. Call with
(dict "settings" DICT "extra" EXTRA_CONFIG "path" VALUES_PATH); a key of
EXTRA_CONFIG that the chart already sets fails the render, because TOML
rejects a repeated key.
*/}}
{{- define "moge-serve.toml" -}}
{{- $settings := .settings }}
{{- range $key, $value := .extra }}
{{- if hasKey $settings $key }}
{{- fail (printf "%s.%s: the chart already sets the setting %q from its own values; remove it from %s" $.path $key $key $.path) }}
{{- end }}
{{- $_ := set $settings $key $value }}
{{- end }}
{{- range $key := keys $settings | sortAlpha }}
{{- $value := get $settings $key }}
{{- if and (kindIs "slice" $value) $value }}
{{ $key }} = [
{{- range $item := $value }}
  {{ toJson $item }},
{{- end }}
]
{{- else }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Volume and mount of the TLS Secret between services, and of the gateway's
own Secrets.
*/}}
{{- define "moge-serve.tlsDirectory" -}}/etc/moge/tls{{- end }}
{{- define "moge-serve.gatewayTlsDirectory" -}}/etc/moge/gateway-tls{{- end }}
{{- define "moge-serve.authTokenDirectory" -}}/etc/moge/auth{{- end }}

{{/*
Checkpoint volume of the kind that checkpoint.source names, always mounted read-only.
*/}}
{{- define "moge-serve.checkpointVolume" -}}
{{- $checkpoint := .Values.checkpoint }}
- name: checkpoint
{{- if eq $checkpoint.source "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ $checkpoint.persistentVolumeClaim.claimName }}
    readOnly: true
{{- else if eq $checkpoint.source "hostPath" }}
  hostPath:
    path: {{ $checkpoint.hostPath.path }}
    type: {{ default "Directory" $checkpoint.hostPath.type }}
{{- else if eq $checkpoint.source "image" }}
  image:
    reference: {{ $checkpoint.image.reference }}
    pullPolicy: {{ default "IfNotPresent" $checkpoint.image.pullPolicy }}
{{- end }}
{{- end }}

{{- define "moge-serve.checkpointMount" -}}
- name: checkpoint
  mountPath: {{ .Values.checkpoint.mountPath }}
  readOnly: true
{{- with .Values.checkpoint.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}

{{/*
Environment of every container: the replica name from the pod name and
the log filter.
*/}}
{{- define "moge-serve.env" -}}
- name: MOGE_REPLICA
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}
