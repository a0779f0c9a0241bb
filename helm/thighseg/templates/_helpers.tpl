{{- define "thighseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* release-name-chart-name, unless the release name already holds it (bitnami convention) */}}
{{- define "thighseg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "thighseg.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "thighseg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "thighseg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "thighseg.labels" -}}
app.kubernetes.io/name: {{ include "thighseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "thighseg.selector" -}}
app.kubernetes.io/name: {{ include "thighseg.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* (dict "image" .Values.images.x "global" .Values.global): registry/repository:tag or @digest */}}
{{- define "thighseg.image" -}}
{{- $registry := default .image.registry (.global).imageRegistry -}}
{{- $repository := ternary (printf "%s/%s" $registry .image.repository) .image.repository (ne $registry "") -}}
{{- if .image.digest -}}
{{ $repository }}@{{ .image.digest }}
{{- else -}}
{{ $repository }}:{{ .image.tag }}
{{- end -}}
{{- end -}}

{{/* from values (podSecurityContext, containerSecurityContext): runAsUser and friends are
     overridable, and null drops a key (OpenShift's restricted SCC assigns the user itself) */}}
{{- define "thighseg.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "thighseg.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{- define "thighseg.tritonUrl" -}}
{{ include "thighseg.fullname" . }}-triton:8000
{{- end -}}
