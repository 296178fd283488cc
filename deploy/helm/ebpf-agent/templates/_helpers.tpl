{{/* Chart name, overridable. */}}
{{- define "ebpf-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects (63 characters at most: a DNS label). */}}
{{- define "ebpf-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ebpf-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the agent's pods: never change them on upgrade. */}}
{{- define "ebpf-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebpf-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ebpf-agent.labels" -}}
helm.sh/chart: {{ include "ebpf-agent.chart" . }}
{{ include "ebpf-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ebpf-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ebpf-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ebpf-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Where the Secret of otlp.tls is mounted (beside, not inside, the ConfigMap's directory). */}}
{{- define "ebpf-agent.tlsDir" -}}
/etc/ebpf-agent-tls
{{- end }}

{{/* An on/off switch of the agent from a boolean value. */}}
{{- define "ebpf-agent.switch" -}}
{{- if . }}on{{ else }}off{{ end }}
{{- end }}

{{/*
The agent's config file. Keys are the agent's long flags in snake_case; repeatable flags
are lists. Unset values are left out so the agent's own defaults apply.
*/}}
{{- define "ebpf-agent.config" -}}
{{- $v := .Values }}
{{- $c := dict }}
{{- with $v.otlp.endpoint }}
{{- $_ := set $c "otlp_endpoint" . }}
{{- end }}
{{- $_ := set $c "otlp_protocol" $v.otlp.protocol }}
{{- $_ := set $c "otlp_compression" $v.otlp.compression }}
{{- $_ := set $c "otlp_timeout" $v.otlp.timeoutMillis }}
{{- $_ := set $c "otlp_insecure" $v.otlp.insecure }}
{{- with $v.otlp.headers }}
{{- if $v.otlp.headersSecret.name }}
{{- fail "otlp.headers and otlp.headersSecret are exclusive (the Secret's list replaces the other): put every header in the Secret" }}
{{- end }}
{{- $_ := set $c "otlp_header" . }}
{{- end }}
{{- with $v.otlp.tls.secretName }}
{{- $tls := $v.otlp.tls }}
{{- if $tls.caKey }}
{{- $_ := set $c "otlp_certificate" (printf "%s/%s" (include "ebpf-agent.tlsDir" $) $tls.caKey) }}
{{- end }}
{{- if and $tls.certKey $tls.keyKey }}
{{- $_ := set $c "otlp_client_certificate" (printf "%s/%s" (include "ebpf-agent.tlsDir" $) $tls.certKey) }}
{{- $_ := set $c "otlp_client_key" (printf "%s/%s" (include "ebpf-agent.tlsDir" $) $tls.keyKey) }}
{{- else if or $tls.certKey $tls.keyKey }}
{{- fail "otlp.tls.certKey and otlp.tls.keyKey go together (mTLS needs the certificate and its key)" }}
{{- end }}
{{- end }}
{{- with $v.selection.namespaces }}
{{- $_ := set $c "k8s_namespace" . }}
{{- end }}
{{- $labels := list }}
{{- range $key, $value := $v.selection.podLabels }}
{{- $labels = append $labels (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- with $labels }}
{{- $_ := set $c "k8s_pod_label" . }}
{{- end }}
{{- $annotations := list }}
{{- range $key, $value := $v.selection.podAnnotations }}
{{- $annotations = append $annotations (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- with $annotations }}
{{- $_ := set $c "k8s_pod_annotation" . }}
{{- end }}
{{- with $v.selection.ports }}
{{- $_ := set $c "port" . }}
{{- end }}
{{- with $v.selection.executables }}
{{- $_ := set $c "exe" . }}
{{- end }}
{{- with $v.selection.comms }}
{{- $_ := set $c "comm" . }}
{{- end }}
{{- $_ := set $c "context_propagation" (include "ebpf-agent.switch" $v.contextPropagation) }}
{{- $_ := set $c "in_process_linking" (include "ebpf-agent.switch" $v.inProcessLinking) }}
{{- $_ := set $c "same_host_pairing" (include "ebpf-agent.switch" $v.sameHostPairing) }}
{{- $_ := set $c "kubernetes" (include "ebpf-agent.switch" $v.kubernetesMetadata) }}
{{- if not (kindIs "invalid" $v.captureSize) }}
{{- $_ := set $c "capture_size" $v.captureSize }}
{{- end }}
{{- $_ := set $c "db_raw_query" $v.dbRawQuery }}
{{- $_ := set $c "stats_interval" $v.statsInterval }}
{{- if $v.metrics.enabled }}
{{- $_ := set $c "metrics_address" (printf "0.0.0.0:%d" (int $v.metrics.port)) }}
{{- end }}
{{- $c = mergeOverwrite $c (deepCopy $v.extraConfig) }}
{{- toYaml $c }}
{{- end }}

{{/* The container's security context: a capability list, or privileged as an opt-in. */}}
{{- define "ebpf-agent.securityContext" -}}
{{- $sc := .Values.securityContext }}
{{- if .Values.privileged }}
privileged: true
{{- else }}
privileged: false
{{- $caps := concat $sc.capabilities $sc.extraCapabilities | uniq }}
{{- /* The API server refuses allowPrivilegeEscalation=false together with SYS_ADMIN. */}}
{{- if not (or (has "SYS_ADMIN" $caps) (has "CAP_SYS_ADMIN" $caps)) }}
allowPrivilegeEscalation: false
{{- end }}
capabilities:
  drop:
    - ALL
  add:
    {{- toYaml $caps | nindent 4 }}
{{- with $sc.seccompProfile }}
seccompProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $sc.appArmorProfile }}
appArmorProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
# Root for /proc of every user's processes; the agent checks the capabilities above, not the uid.
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
readOnlyRootFilesystem: true
{{- end }}

{{/* A kubelet probe of the agent's health endpoint: path, then the probe's values. */}}
{{- define "ebpf-agent.probe" -}}
{{- $path := index . 0 }}
{{- $p := index . 1 -}}
httpGet:
  path: {{ $path }}
  port: metrics
{{- range $key := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "failureThreshold" }}
{{- if hasKey $p $key }}
{{ $key }}: {{ index $p $key }}
{{- end }}
{{- end }}
{{- end }}
