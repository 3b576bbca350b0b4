{{/*
Named templates: names, labels, the image, and the reusable sidecar container.

Charts that depend on this one put the sidecar into their own pod spec:

  containers:
    - name: my-app
      ...
    {{- include "task-tracking.sidecarContainer" . | nindent 4 }}
  volumes:
    {{- include "task-tracking.sidecarVolumes" . | nindent 4 }}

Called from a parent chart, "." is the parent's context; the templates then
switch to this chart's own context (.Subcharts "task-tracking") so that names
and values resolve exactly as they do inside this chart.
*/}}

{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "task-tracking.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name of the release's objects. */}}
{{- define "task-tracking.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "task-tracking.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "task-tracking.labels" -}}
helm.sh/chart: {{ include "task-tracking.chart" . }}
{{ include "task-tracking.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: task-tracking
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the demo pods (immutable once deployed). */}}
{{- define "task-tracking.selectorLabels" -}}
app.kubernetes.io/name: {{ include "task-tracking.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* ServiceAccount the pods run as. */}}
{{- define "task-tracking.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "task-tracking.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Name of the TaskTracking resource to watch, or "" when the watch is off. */}}
{{- define "task-tracking.resourceName" -}}
{{- if .Values.taskTracking.watch -}}
{{- default (include "task-tracking.fullname" .) .Values.taskTracking.name -}}
{{- end -}}
{{- end -}}

{{/* Sidecar image reference: a digest pins it, else the tag (default appVersion). */}}
{{- define "task-tracking.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag must not be \"latest\": pin a version (the chart's appVersion is the default)" -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The sidecar container, as one item of a containers (or, with sidecar.native,
initContainers) list. It needs the volumes of "task-tracking.sidecarVolumes".
*/}}
{{- define "task-tracking.sidecarContainer" -}}
{{- if and (ne .Chart.Name "task-tracking") .Subcharts (hasKey .Subcharts "task-tracking") -}}
{{- include "task-tracking.sidecarContainer" (index .Subcharts "task-tracking") -}}
{{- else -}}
{{- $v := .Values -}}
{{- if and $v.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "sidecar.native needs Kubernetes 1.29 or newer (this cluster: %s); set sidecar.native=false" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
- name: {{ $v.sidecar.name }}
  image: {{ include "task-tracking.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $v.sidecar.native }}
  # Native sidecar (Kubernetes 1.29+): starts before, and stops after, the app.
  restartPolicy: Always
  {{- end }}
  args:
    - run
  ports:
    - name: tt-metrics
      containerPort: {{ $v.http.port }}
      protocol: TCP
  env:
    - name: TASK_TRACKING_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ required "redis.existingSecret is required: the name of a Secret holding the Redis URL (kubectl create secret generic redis --from-literal=redis-url=redis://...)" $v.redis.existingSecret | quote }}
          key: {{ $v.redis.existingSecretKey | quote }}
    - name: TASK_TRACKING_REDIS_STREAM_KEY
      value: {{ $v.redis.streamKey | quote }}
    - name: TASK_TRACKING_REDIS_PROJECTOR_CONSUMER_GROUP
      value: {{ $v.redis.projectorConsumerGroup | quote }}
    - name: TASK_TRACKING_REDIS_ARCHIVER_CONSUMER_GROUP
      value: {{ $v.redis.archiverConsumerGroup | quote }}
    - name: TASK_TRACKING_REDIS_CONSUMER_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: TASK_TRACKING_REDIS_BATCH_SIZE
      value: {{ int64 $v.redis.batchSize | quote }}
    - name: TASK_TRACKING_REDIS_BLOCK_MS
      value: {{ int64 $v.redis.blockMs | quote }}
    - name: TASK_TRACKING_REDIS_CLAIM_IDLE_MS
      value: {{ int64 $v.redis.claimIdleMs | quote }}
    - name: TASK_TRACKING_REDIS_STREAM_MAXLEN
      value: {{ int64 $v.redis.streamMaxlen | quote }}
    - name: TASK_TRACKING_ARCHIVE_OFF_PIN_SECONDS
      value: {{ int64 $v.archive.offPinSeconds | quote }}
    - name: TASK_TRACKING_S3_ARCHIVE_ENABLED
      value: {{ $v.archive.enabled | toString | quote }}
    - name: TASK_TRACKING_ARCHIVE_SINK
      value: {{ $v.archive.sink | quote }}
    {{- if $v.archive.bucket }}
    - name: TASK_TRACKING_S3_BUCKET
      value: {{ $v.archive.bucket | quote }}
    {{- end }}
    - name: TASK_TRACKING_S3_PREFIX
      value: {{ $v.archive.prefix | quote }}
    {{- if $v.archive.region }}
    - name: TASK_TRACKING_S3_REGION
      value: {{ $v.archive.region | quote }}
    {{- end }}
    {{- if $v.archive.endpointUrl }}
    - name: TASK_TRACKING_S3_ENDPOINT_URL
      value: {{ $v.archive.endpointUrl | quote }}
    {{- end }}
    {{- if eq $v.archive.sink "folder" }}
    - name: TASK_TRACKING_ARCHIVE_FOLDER
      value: {{ $v.archive.folder.path | quote }}
    {{- end }}
    - name: TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS
      value: {{ int64 $v.archive.flush.maxEvents | quote }}
    - name: TASK_TRACKING_ARCHIVE_FLUSH_MAX_BYTES
      value: {{ int64 $v.archive.flush.maxBytes | quote }}
    - name: TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS
      value: {{ int64 $v.archive.flush.maxAgeSeconds | quote }}
    - name: TASK_TRACKING_PROJECTION_TTL_SECONDS
      value: {{ int64 $v.retention.projectionTtlSeconds | quote }}
    - name: TASK_TRACKING_PROJECT_INDEX_MAX_AGE_DAYS
      value: {{ int64 $v.retention.projectIndexMaxAgeDays | quote }}
    - name: TASK_TRACKING_PROJECT_INDEX_MAX_SIZE
      value: {{ int64 $v.retention.projectIndexMaxSize | quote }}
    - name: TASK_TRACKING_MAX_EVENT_BYTES
      value: {{ int64 $v.events.maxBytes | quote }}
    - name: TASK_TRACKING_MAX_FUTURE_SECONDS
      value: {{ int64 $v.events.maxFutureSeconds | quote }}
    - name: TASK_TRACKING_DEAD_LETTER_MAXLEN
      value: {{ int64 $v.events.deadLetterMaxlen | quote }}
    - name: TASK_TRACKING_HTTP_PORT
      value: {{ int64 $v.http.port | quote }}
    - name: TASK_TRACKING_HTTP_HOST
      value: {{ $v.http.host | quote }}
    - name: TASK_TRACKING_LOG_LEVEL
      value: {{ $v.logLevel | quote }}
    - name: TASK_TRACKING_RESOURCE_NAME
      value: {{ include "task-tracking.resourceName" . | quote }}
    - name: TASK_TRACKING_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- with $v.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: tt-metrics
    {{- toYaml $v.sidecar.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: tt-metrics
    {{- toYaml $v.sidecar.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: tt-metrics
    {{- toYaml $v.sidecar.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml $v.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: task-tracking-tmp
      mountPath: /tmp
    {{- if eq $v.archive.sink "folder" }}
    - name: task-tracking-archive
      mountPath: {{ $v.archive.folder.path | quote }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* The volumes the sidecar container mounts, as items of a pod's volumes list. */}}
{{- define "task-tracking.sidecarVolumes" -}}
{{- if and (ne .Chart.Name "task-tracking") .Subcharts (hasKey .Subcharts "task-tracking") -}}
{{- include "task-tracking.sidecarVolumes" (index .Subcharts "task-tracking") -}}
{{- else -}}
{{- $v := .Values -}}
- name: task-tracking-tmp
  emptyDir:
    sizeLimit: {{ $v.sidecar.tmpSizeLimit }}
{{- if eq $v.archive.sink "folder" }}
- name: task-tracking-archive
  persistentVolumeClaim:
    claimName: {{ required "archive.folder.existingClaim is required when archive.sink is \"folder\"" $v.archive.folder.existingClaim | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Labels that select the read API's pods (apart from the demo pods'). */}}
{{- define "task-tracking.apiSelectorLabels" -}}
app.kubernetes.io/name: {{ include "task-tracking.name" . }}-api
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end -}}
