{{/* Names, labels and the image. */}}

{{- define "pullthrough.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: the release name when it already says pullthrough (so
`helm install pullthrough ...` gives the names of the kustomize base: pullthrough,
pullthrough-config, pullthrough-webhook), else <release>-pullthrough. 52 characters leave room
for the longest suffix (-webhook-ca) within 63.
*/}}
{{- define "pullthrough.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pullthrough.webhookName" -}}
{{- printf "%s-webhook" (include "pullthrough.fullname" .) -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "pullthrough.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The DaemonSet's selector (immutable: never add to it). */}}
{{- define "pullthrough.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pullthrough.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pullthrough.labels" -}}
app.kubernetes.io/name: {{ include "pullthrough.name" . }}
{{ include "pullthrough.commonLabels" . }}
{{- end -}}

{{/* The webhook's selector and labels. */}}
{{- define "pullthrough.webhookSelectorLabels" -}}
app.kubernetes.io/name: {{ include "pullthrough.name" . }}-webhook
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pullthrough.webhookLabels" -}}
app.kubernetes.io/name: {{ include "pullthrough.name" . }}-webhook
app.kubernetes.io/component: admission-webhook
{{ include "pullthrough.commonLabels" . }}
{{- end -}}

{{- define "pullthrough.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pullthrough.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pullthrough.webhookServiceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create -}}
{{- default (include "pullthrough.webhookName" .) .Values.webhook.serviceAccount.name -}}
{{- else -}}
{{- required "webhook.serviceAccount.name is required when webhook.serviceAccount.create is false" .Values.webhook.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pullthrough.webhookTlsSecret" -}}
{{- default (printf "%s-tls" (include "pullthrough.webhookName" .)) .Values.webhook.tls.secretName -}}
{{- end -}}

{{- define "pullthrough.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
A map of labels or annotations under `key:` at `indent`, or nothing when empty. Usage:
  {{- include "pullthrough.map" (dict "key" "annotations" "value" $map "indent" 2) }}
*/}}
{{- define "pullthrough.map" -}}
{{- with .value }}
{{ printf "%s:" $.key | indent $.indent }}
{{ toYaml . | indent (add $.indent 2 | int) }}
{{- end }}
{{- end -}}
