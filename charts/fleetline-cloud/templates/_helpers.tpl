{{/* The release's base name, at most 40 characters so role suffixes fit. */}}
{{- define "fleetline.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetline.version" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "fleetline.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The cluster's pods: what the nodes' pod watch selects. */}}
{{- define "fleetline.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleetline.selectorString" -}}
app.kubernetes.io/name={{ .Chart.Name }},app.kubernetes.io/instance={{ .Release.Name }}
{{- end -}}

{{/* The roles that run, as a list of names, in a fixed order. */}}
{{- define "fleetline.roles" -}}
{{- $out := list -}}
{{- if eq .Values.storage.type "pvc" -}}
{{- $out = list "node" -}}
{{- else -}}
{{- range $r := list "ingest" "jobs" "api" "inference" -}}
{{- $spec := index $.Values.roles $r -}}
{{- if gt (int $spec.replicas) 0 -}}{{- $out = append $out $r -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "fleetline.brokerUrl" -}}
{{- if eq .Values.broker.mode "bundled" -}}
mqtt://{{ include "fleetline.fullname" . }}-broker:{{ .Values.broker.bundled.service.port }}
{{- else -}}
{{- required "broker.external.url is required with broker.mode=external" .Values.broker.external.url -}}
{{- end -}}
{{- end -}}
