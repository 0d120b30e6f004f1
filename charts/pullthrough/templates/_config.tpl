{{/*
The TOML files the binary reads, rendered from values. Strings go through toJson: a JSON string
is a valid TOML basic string (Go's encoder emits only escapes TOML shares, \uXXXX included).
Numbers go through int64: Helm reads every YAML number as a float, which would print 1.6e+07.
A key whose value is empty is left out, so the binary's default applies.
*/}}

{{- define "pullthrough.toml.upstreams" -}}
{{- range .Values.settings.upstreams }}

[upstreams.{{ toJson .registry }}]
prefix = {{ toJson .prefix }}
{{- with .server }}
server = {{ toJson . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "pullthrough.toml.server" -}}
{{- $s := .Values.settings.server -}}
{{- if or $s.header_read_timeout $s.max_connections }}

[server]
{{- with $s.header_read_timeout }}
header_read_timeout = {{ toJson . }}
{{- end }}
{{- with $s.max_connections }}
max_connections = {{ int64 . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The mirror's and the hosts installer's config.toml. */}}
{{- define "pullthrough.configToml" -}}
{{- if .Values.config -}}
{{- .Values.config -}}
{{- else -}}
{{- $s := .Values.settings -}}
# pullthrough's config on every node, rendered by the Helm chart from its values (settings.*).
# docs/pullthrough.example.toml documents every key.

# The mirror containerd talks to: loopback only.
listen = "127.0.0.1:{{ int64 .Values.ports.mirror }}"
# /healthz, /readyz and /metrics: the kubelet's probes and Prometheus reach them on the node IP.
ops_listen = "0.0.0.0:{{ int64 .Values.ports.ops }}"
{{- with $s.default_upstream }}
default_upstream = {{ toJson . }}
{{- end }}

[ecr]
{{- range $key := list "region" "account" "endpoint" "ca_file" }}
{{- with index $s.ecr $key }}
{{ $key }} = {{ toJson . }}
{{- end }}
{{- end }}
{{- include "pullthrough.toml.upstreams" . }}

[timeouts]
{{- range $key := list "connect" "response_headers" "shutdown" }}
{{- with index $s.timeouts $key }}
{{ $key }} = {{ toJson . }}
{{- end }}
{{- end }}

[breaker]
{{- with $s.breaker.cooldown }}
cooldown = {{ toJson . }}
{{- end }}

[manifest_cache]
{{- with $s.manifest_cache.max_bytes }}
max_bytes = {{ int64 . }}
{{- end }}
{{- include "pullthrough.toml.server" . }}
{{ end -}}
{{- end -}}

{{/* The webhook's pullthrough.toml. */}}
{{- define "pullthrough.webhookToml" -}}
{{- if .Values.webhook.config -}}
{{- .Values.webhook.config -}}
{{- else -}}
{{- $s := .Values.settings -}}
{{- $w := .Values.webhook.settings -}}
{{- if not (or $s.ecr.endpoint (and $s.ecr.account $s.ecr.region)) -}}
{{- fail "webhook.enabled needs settings.ecr.account and settings.ecr.region (or settings.ecr.endpoint): rewritten images name <account>.dkr.ecr.<region>.amazonaws.com" -}}
{{- end -}}
# pullthrough's webhook config, rendered by the Helm chart from its values (settings.ecr,
# settings.upstreams and webhook.settings). docs/pullthrough.example.toml documents every key.

[ecr]
{{- range $key := list "region" "account" "endpoint" }}
{{- with index $s.ecr $key }}
{{ $key }} = {{ toJson . }}
{{- end }}
{{- end }}
{{- include "pullthrough.toml.upstreams" . }}

[webhook]
listen = "0.0.0.0:{{ int64 .Values.webhook.ports.https }}"
ops_listen = "0.0.0.0:{{ int64 .Values.webhook.ports.ops }}"
cert_file = "/etc/pullthrough/webhook-tls/tls.crt"
key_file = "/etc/pullthrough/webhook-tls/tls.key"
mode = {{ toJson $w.mode }}
# Plus the webhook's own namespace, always.
skip_namespaces = {{ toJson $w.skip_namespaces }}
{{- with $w.exclude }}
exclude = {{ toJson . }}
{{- end }}
{{- with $w.annotation }}
annotation = {{ toJson . }}
{{- end }}
digest_refs = {{ toJson $w.digest_refs }}

[timeouts]
{{- with $s.timeouts.shutdown }}
# Shorter than the Deployment's terminationGracePeriodSeconds.
shutdown = {{ toJson . }}
{{- end }}
{{- include "pullthrough.toml.server" . }}
{{ end -}}
{{- end -}}
