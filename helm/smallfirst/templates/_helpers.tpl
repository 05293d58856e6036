{{/* Names ---------------------------------------------------------------------------------- */}}
{{- define "smallfirst.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "smallfirst.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "smallfirst.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "smallfirst.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "smallfirst.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: call with (dict "root" $ "component" "api") ---------------------------------------- */}}
{{- define "smallfirst.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smallfirst.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "smallfirst.labels" -}}
helm.sh/chart: {{ include "smallfirst.chart" .root }}
{{ include "smallfirst.selectorLabels" . }}
app.kubernetes.io/part-of: smallfirst
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Image reference: call with (dict "root" $ "repository" "smallfirst-api") */}}
{{- define "smallfirst.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Autoscaling of the worker pools: keda, hpa or none ----------------------------------------- */}}
{{- define "smallfirst.autoscalingMode" -}}
{{- $mode := .Values.autoscaling.mode -}}
{{- if eq $mode "auto" -}}
{{- if .Capabilities.APIVersions.Has "keda.sh/v1alpha1" -}}keda{{- else -}}hpa{{- end -}}
{{- else -}}
{{- $mode -}}
{{- end -}}
{{- end -}}

{{/* Workers: the grace period covers the longest task plus soft shutdown plus a margin. ----------- */}}
{{- define "smallfirst.workerGracePeriodS" -}}
{{- $r := .Values.workers.reliability -}}
{{- if le (int $r.brokerVisibilityTimeoutS) (int $r.taskTimeLimitS) -}}
{{- fail "workers.reliability.brokerVisibilityTimeoutS must exceed taskTimeLimitS, or running tasks are delivered twice" -}}
{{- end -}}
{{- add (int $r.taskTimeLimitS) (int $r.softShutdownTimeoutS) (int $r.terminationMarginS) -}}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------------ */}}
{{- define "smallfirst.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: SMALLFIRST_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "smallfirst.fullname" .) | quote }}
{{- else if .Values.externalRedis.existingSecret }}
- name: SMALLFIRST_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret | quote }}
      key: {{ .Values.externalRedis.existingSecretKey | quote }}
{{- else if .Values.externalRedis.url }}
- name: SMALLFIRST_REDIS_URL
  value: {{ .Values.externalRedis.url | quote }}
{{- else }}
{{- fail "set redis.enabled, externalRedis.url or externalRedis.existingSecret" }}
{{- end }}
{{- end -}}

{{- define "smallfirst.kedaRedisAddress" -}}
{{- if .Values.autoscaling.keda.redisAddress -}}
{{- .Values.autoscaling.keda.redisAddress -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis.%s.svc.%s:6379" (include "smallfirst.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- fail "autoscaling.keda.redisAddress (host:port) is required with an external Redis" -}}
{{- end -}}
{{- end -}}

{{/* Catalog ---------------------------------------------------------------------------------- */}}
{{- define "smallfirst.catalogConfigMap" -}}
{{- default (printf "%s-catalog" (include "smallfirst.fullname" .)) .Values.catalog.existingConfigMap -}}
{{- end -}}

{{/* Inference targets: served model name -> dns:/// target of its headless Service (JSON). ------- */}}
{{- define "smallfirst.inferenceTargets" -}}
{{- $targets := dict -}}
{{- range $key, $model := .Values.inference.models -}}
{{- if $model.enabled -}}
{{- $_ := set $targets $model.servedModelName (printf "dns:///%s-inference-%s-headless:%d" (include "smallfirst.fullname" $) $key (int $.Values.inference.grpcPort)) -}}
{{- end -}}
{{- end -}}
{{- toJson (merge $targets .Values.inference.extraTargets) -}}
{{- end -}}

{{/* Frontier: the simulator is used when asked for, or (auto) when no API key is configured. ------ */}}
{{- define "smallfirst.useSimulator" -}}
{{- $mode := .Values.frontierSim.mode -}}
{{- if or (eq $mode "enabled") (and (eq $mode "auto") (not .Values.anthropic.apiKey) (not .Values.anthropic.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{- define "smallfirst.anthropicEnv" -}}
{{- if include "smallfirst.useSimulator" . }}
# No ANTHROPIC_API_KEY: the frontier pool sends its calls to the simulator at this URL.
- name: SMALLFIRST_FRONTIER_SIM_URL
  value: {{ printf "http://%s-frontier-sim:%d" (include "smallfirst.fullname" .) (int .Values.frontierSim.port) | quote }}
{{- else if or .Values.anthropic.apiKey .Values.anthropic.existingSecret }}
- name: ANTHROPIC_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-anthropic" (include "smallfirst.fullname" .)) .Values.anthropic.existingSecret | quote }}
      key: {{ .Values.anthropic.existingSecretKey | quote }}
{{- with .Values.anthropic.baseUrl }}
- name: SMALLFIRST_FRONTIER_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- else }}
{{- fail "frontierSim.mode is disabled: set anthropic.apiKey or anthropic.existingSecret" }}
{{- end }}
{{- end -}}

{{/* Environment of every smallfirst container: call with (dict "root" $ "service" "smallfirst-api") */}}
{{- define "smallfirst.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- include "smallfirst.redisEnv" .root }}
- name: SMALLFIRST_CATALOG_PATH
  value: /etc/smallfirst/catalog
- name: SMALLFIRST_INFERENCE_TARGETS
  value: {{ include "smallfirst.inferenceTargets" .root | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
{{- if .root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .root.Values.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_TRACES_SAMPLER
  value: {{ .root.Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .root.Values.otel.samplerArg | quote }}
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
- name: OTEL_METRICS_EXPORTER
  value: none
- name: OTEL_LOGS_EXPORTER
  value: none
{{- range $name, $value := .root.Values.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volumes every smallfirst pod mounts: /tmp (the root filesystem is read-only). */}}
{{- define "smallfirst.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}
