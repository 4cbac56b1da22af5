{{/*
TOML configuration of each component, read through --config. Keys are the
binaries' flag names with "_" in place of "-".
*/}}

{{/*
Expert configuration: the checkpoint, the layers and only this workload's
group (or the shared expert). Call with (dict "root" $ "item" ITEM).
*/}}
{{- define "moge-serve.expertConfig" -}}
{{- $root := .root }}
{{- $settings := include "moge-serve.serverSettings" $root | fromJson }}
{{- $_ := set $settings "checkpoint" $root.Values.checkpoint.mountPath }}
{{- with $root.Values.checkpoint.layers }}
{{- $_ := set $settings "layers" . }}
{{- end }}
{{- if eq .item.component "shared-expert" }}
{{- $_ := set $settings "shared_expert" true }}
{{- else }}
{{- $_ := set $settings "group" (int .item.group) }}
{{- end }}
{{- $_ := set $settings "weights" .item.settings.weights }}
{{- $_ := set $settings "compute_threads" (int .item.settings.computeThreads) }}
{{- include "moge-serve.serverTlsSettings" (dict "settings" $settings "directory" (include "moge-serve.tlsDirectory" $root) "secret" $root.Values.tls.secretName "mutual" $root.Values.tls.mutual) }}
{{- $path := ternary "sharedExpert.extraConfig" (printf "expertGroups[%d].extraConfig" (int .item.group)) (eq .item.component "shared-expert") }}
{{- include "moge-serve.toml" (dict "settings" $settings "extra" .item.settings.extraConfig "path" $path) }}
{{- end }}

{{- define "moge-serve.routerConfig" -}}
{{- $settings := include "moge-serve.serverSettings" . | fromJson }}
{{- $_ := set $settings "checkpoint" .Values.checkpoint.mountPath }}
{{- with .Values.checkpoint.layers }}
{{- $_ := set $settings "layers" . }}
{{- end }}
{{- $_ := set $settings "routing" .Values.router.routing }}
{{- include "moge-serve.serverTlsSettings" (dict "settings" $settings "directory" (include "moge-serve.tlsDirectory" .) "secret" .Values.tls.secretName "mutual" .Values.tls.mutual) }}
{{- include "moge-serve.toml" (dict "settings" $settings "extra" .Values.router.extraConfig "path" "router.extraConfig") }}
{{- end }}

{{/*
Gateway configuration. The upstream addresses come from the rendered
Services: the router's Service, and for every expert workload the DNS name
of each StatefulSet pod under its headless Service, so that the gateway
balances over and fails over between the replicas itself.
*/}}
{{- define "moge-serve.gatewayConfig" -}}
{{- $gateway := .Values.gateway }}
{{- $settings := include "moge-serve.serverSettings" . | fromJson }}
{{- $_ := set $settings "http_port" (int .Values.ports.http) }}
{{- $_ := set $settings "model_name" $gateway.modelName }}
{{- $_ := set $settings "max_batch_tokens" (int $gateway.maxBatchTokens) }}
{{- $_ := set $settings "max_queue_delay_us" (int $gateway.maxQueueDelayUs) }}
{{- $_ := set $settings "max_inflight_batches" (int $gateway.maxInflightBatches) }}
{{- $_ := set $settings "probe_interval_ms" (int $gateway.probeIntervalMs) }}
{{- $_ := set $settings "startup_timeout_seconds" (int $gateway.startupTimeoutSeconds) }}

{{- $router := printf "%s-router" (include "moge-serve.fullname" .) }}
{{- $routerURL := printf "%s://%s.%s.svc.%s:%d" (include "moge-serve.scheme" .) $router .Release.Namespace .Values.clusterDomain (int .Values.ports.grpc) }}
{{- $_ := set $settings "router" (list $routerURL) }}
{{- $groups := list }}
{{- range $item := (include "moge-serve.experts" . | fromJson).items }}
{{- $urls := include "moge-serve.replicaURLs" (dict "root" $ "item" $item) }}
{{- if eq $item.component "shared-expert" }}
{{- $_ := set $settings "shared_expert" (splitList "," $urls) }}
{{- else }}
{{- $groups = append $groups $urls }}
{{- end }}
{{- end }}
{{- $_ := set $settings "group" $groups }}

{{- include "moge-serve.serverTlsSettings" (dict "settings" $settings "directory" (include "moge-serve.gatewayTlsDirectory" .) "secret" $gateway.tls.secretName "mutual" $gateway.tls.requireClientCertificates) }}
{{- if .Values.tls.secretName }}
{{- $directory := include "moge-serve.tlsDirectory" . }}
{{- $_ := set $settings "upstream_tls_ca_file" (printf "%s/ca.crt" $directory) }}
{{- if .Values.tls.mutual }}
{{- $_ := set $settings "upstream_tls_cert_file" (printf "%s/tls.crt" $directory) }}
{{- $_ := set $settings "upstream_tls_key_file" (printf "%s/tls.key" $directory) }}
{{- end }}
{{- end }}
{{- if $gateway.authToken.secretName }}
{{- $_ := set $settings "auth_token_file" (printf "%s/%s" (include "moge-serve.authTokenDirectory" .) $gateway.authToken.key) }}
{{- end }}
{{- include "moge-serve.toml" (dict "settings" $settings "extra" $gateway.extraConfig "path" "gateway.extraConfig") }}
{{- end }}

{{/*
Adds the server TLS keys to a settings dict when a Secret is named. Call
with (dict "settings" DICT "directory" MOUNT "secret" NAME "mutual" BOOL).
*/}}
{{- define "moge-serve.serverTlsSettings" -}}
{{- if .secret }}
{{- $_ := set .settings "tls_cert_file" (printf "%s/tls.crt" .directory) }}
{{- $_ := set .settings "tls_key_file" (printf "%s/tls.key" .directory) }}
{{- if .mutual }}
{{- $_ := set .settings "tls_client_ca_file" (printf "%s/ca.crt" .directory) }}
{{- end }}
{{- end }}
{{- end }}
