{{/*
Names, labels and the two templates an application chart uses to add the sidecar to its pod.

An application chart that lists this chart as a dependency (alias `sidecar`, mode `sidecar`)
adds the container and its volumes to its own pod:

  containers:
    {{- include "sidecar.container" (dict "Values" .Values.sidecar "Release" .Release "Chart" (dict "Name" "sidecar")) | nindent 8 }}
  volumes:
    {{- include "sidecar.volumes" (dict "Values" .Values.sidecar "Release" .Release "Chart" (dict "Name" "sidecar")) | nindent 8 }}

Both take a context with `Values` (the sidecar chart's values), `Release` and `Chart.Name`;
the names they render match the ConfigMap and Secret this chart creates.
*/}}

{{- define "sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.fullname" -}}
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

{{- define "sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name (.Chart.Version | default "") | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the sidecar's pods: its own in deployment mode, the application's in sidecar mode. */}}
{{- define "sidecar.selectorLabels" -}}
{{- if eq .Values.mode "sidecar" }}
{{- toYaml .Values.injection.podSelector }}
{{- else -}}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- end }}

{{- define "sidecar.labels" -}}
helm.sh/chart: {{ include "sidecar.chart" . }}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | default "unknown" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: observability
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sidecar.secretName" -}}
{{- default (include "sidecar.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* True (non-empty) when the pod mounts a Secret: an existing one, or one the chart creates. */}}
{{- define "sidecar.hasSecret" -}}
{{- with .Values.secrets }}
{{- if or .existingSecret .discordWebhookUrl .smtpPassword .receiverToken }}true{{ end }}
{{- end }}
{{- end }}

{{/* The configuration file: the chart's defaults, the user's `config`, then the listen address. */}}
{{- define "sidecar.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.ports.http)) }}
{{- $_ := set $config "server" $server }}
{{- /* The receiver listens beyond loopback in a pod, so it needs an explicit auth setting:
       the bearer token from the chart's Secret when there is one, else none. */}}
{{- $alerts := get $config "alerts" | default dict }}
{{- $receiver := get $alerts "receiver" | default dict }}
{{- if not (hasKey $receiver "auth") }}
{{- if or .Values.secrets.receiverToken .Values.secrets.existingSecret }}
{{- $_ := set $receiver "auth" (dict "bearer_tokens" (list (dict "file" "/etc/sidecar-secrets/receiver-token"))) }}
{{- else }}
{{- $_ := set $receiver "auth" "none" }}
{{- end }}
{{- $_ := set $alerts "receiver" $receiver }}
{{- $_ := set $config "alerts" $alerts }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{- define "sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | default "latest") }}
{{- end }}

{{/* The sidecar container, for this chart's Deployment and for an application's pod. */}}
{{- define "sidecar.container" -}}
- name: sidecar
  image: {{ include "sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - run
    - --config
    - /etc/sidecar/sidecar.yaml
  workingDir: /var/lib/sidecar
  ports:
    - name: http
      containerPort: {{ .Values.ports.http }}
      protocol: TCP
    - name: otlp
      containerPort: {{ .Values.ports.otlp }}
      protocol: TCP
    - name: statsd
      containerPort: {{ .Values.ports.statsd }}
      protocol: UDP
  {{- with .Values.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /livez
      port: http
    periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
    timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
    failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: http
    periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
    timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
    failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
  startupProbe:
    httpGet:
      path: /livez
      port: http
    periodSeconds: {{ .Values.startupProbe.periodSeconds }}
    timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
    failureThreshold: {{ .Values.startupProbe.failureThreshold }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidecar-config
      mountPath: /etc/sidecar
      readOnly: true
    - name: sidecar-data
      mountPath: /var/lib/sidecar
    - name: sidecar-tmp
      mountPath: /tmp
    {{- if include "sidecar.hasSecret" . }}
    - name: sidecar-secrets
      mountPath: /etc/sidecar-secrets
      readOnly: true
    {{- end }}
{{- end }}

{{/* The volumes the container mounts. */}}
{{- define "sidecar.volumes" -}}
- name: sidecar-config
  configMap:
    name: {{ include "sidecar.fullname" . }}
- name: sidecar-data
  {{- if .Values.dataVolume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.dataVolume.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.dataVolume.sizeLimit }}
  {{- end }}
- name: sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if include "sidecar.hasSecret" . }}
- name: sidecar-secrets
  secret:
    secretName: {{ include "sidecar.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}
