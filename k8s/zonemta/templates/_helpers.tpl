{{/* Names. */}}
{{- define "zonemta.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zonemta.fullname" -}}
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

{{- define "zonemta.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of everything in the release; "component" is added per workload. */}}
{{- define "zonemta.labels" -}}
helm.sh/chart: {{ include "zonemta.chart" . }}
app.kubernetes.io/name: {{ include "zonemta.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zonemta
{{- end -}}

{{- define "zonemta.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zonemta.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zonemta.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zonemta.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a service: (dict "root" $ "service" "ingest"). */}}
{{- define "zonemta.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .service $tag -}}
{{- end -}}

{{/* The zones as YAML: the values' zones, else default and bounces. Names are checked. */}}
{{- define "zonemta.zones" -}}
{{- $zones := .Values.zones | default dict -}}
{{- if not $zones -}}
{{- $zones = dict "default" dict "bounces" (dict "connections" 1) -}}
{{- end -}}
{{- range $name, $zone := $zones -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$" $name) -}}
{{- fail (printf "zones: %q is not usable as a zone name on Kubernetes (lower case letters, digits and -, at most 32)" $name) -}}
{{- end -}}
{{- end -}}
{{- toYaml $zones -}}
{{- end -}}

{{/* A zone's sender settings: the zone's `sender:` over the defaults in `sender:`. */}}
{{- define "zonemta.senderSettings" -}}
{{- $own := (get .zone "sender") | default dict -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.sender) (deepCopy $own)) -}}
{{- end -}}

{{/* The metrics port of a zone's senders: (dict "root" $ "name" zone-name "zone" zone).
With hostNetwork and no port of the zone's own, the default plus the zone's position
among the zones (by name), so that the zones sharing a node do not collide. */}}
{{- define "zonemta.senderMetricsPort" -}}
{{- $own := (get .zone "sender") | default dict -}}
{{- $sender := include "zonemta.senderSettings" (dict "root" .root "zone" .zone) | fromYaml -}}
{{- $port := int $sender.metricsPort -}}
{{- if and $sender.hostNetwork (not (hasKey $own "metricsPort")) -}}
{{- $zones := include "zonemta.zones" .root | fromYaml -}}
{{- range $i, $n := (keys $zones | sortAlpha) -}}
{{- if eq $n $.name -}}{{- $port = add $port $i -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* URLs of the stores: the release's own charts when enabled, else `dbs`. */}}
{{- define "zonemta.dbs" -}}
{{- $dbs := dict "postgres_pool_size" (int .Values.dbs.postgres_pool_size) -}}
{{- if .Values.postgresql.enabled -}}
{{- $_ := set $dbs "postgres" (printf "postgresql://%s@%s-postgresql:5432/%s" .Values.postgresql.auth.username .Release.Name .Values.postgresql.auth.database) -}}
{{- else if .Values.dbs.postgres -}}
{{- $_ := set $dbs "postgres" .Values.dbs.postgres -}}
{{- else if not .Values.dbs.existingSecret -}}
{{- fail "set dbs.postgres (the PostgreSQL URL), dbs.existingSecret or postgresql.enabled" -}}
{{- end -}}
{{- if .Values.redis.enabled -}}
{{- /* with auth, the URL with the password comes from the environment (zonemta.env) */ -}}
{{- $_ := set $dbs "redis" (printf "redis://%s-redis-master:6379/3" .Release.Name) -}}
{{- else if .Values.dbs.redis -}}
{{- $_ := set $dbs "redis" .Values.dbs.redis -}}
{{- else if not .Values.dbs.existingSecret -}}
{{- fail "set dbs.redis (the Redis URL), dbs.existingSecret or redis.enabled" -}}
{{- end -}}
{{- if .Values.nats.enabled -}}
{{- $_ := set $dbs "nats" (printf "nats://%s-nats:4222" .Release.Name) -}}
{{- else if .Values.dbs.nats -}}
{{- $_ := set $dbs "nats" .Values.dbs.nats -}}
{{- else if not .Values.dbs.existingSecret -}}
{{- fail "set dbs.nats (the NATS URL), dbs.existingSecret or nats.enabled" -}}
{{- end -}}
{{- toYaml $dbs -}}
{{- end -}}

{{/* The config file every service reads. */}}
{{- define "zonemta.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- range $key := list "zones" "dbs" "metrics" -}}
{{- if hasKey $config $key -}}
{{- fail (printf "config.%s: set it through the chart's own values (%s), not under config" $key $key) -}}
{{- end -}}
{{- end -}}
{{- $zones := dict -}}
{{- range $name, $zone := (include "zonemta.zones" . | fromYaml) -}}
{{- $_ := set $zones $name (omit $zone "sender") -}}
{{- end -}}
{{- $queue := get $config "queue" | default dict -}}
{{- $default := get $queue "default_zone" | default "default" -}}
{{- if not (hasKey $zones $default) -}}
{{- fail (printf "config.queue.default_zone %q is not one of the zones (%s)" $default (keys $zones | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $bounce := get $config "bounce" | default dict -}}
{{- if and (get $bounce "zone") (not (hasKey $zones (get $bounce "zone"))) -}}
{{- fail (printf "config.bounce.zone %q is not one of the zones (%s)" (get $bounce "zone") (keys $zones | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $_ := set $config "zones" $zones -}}
{{- $_ := set $config "dbs" (include "zonemta.dbs" . | fromYaml) -}}
{{- $_ := set $config "metrics" (dict "host" "0.0.0.0" "ingest_port" (int .Values.metrics.ingestPort) "queue_port" (int .Values.metrics.queuePort) "bounce_port" (int .Values.metrics.bouncePort) "sender_port" (int .Values.sender.metricsPort)) -}}
{{- $api := get $config "api" | default dict -}}
{{- $_ := set $api "host" "0.0.0.0" -}}
{{- $_ := set $api "port" (int .Values.api.port) -}}
{{- if get $api "open_access" -}}
{{- fail "config.api.open_access: the API in a pod is not on loopback; give it keys (apiKeys)" -}}
{{- end -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys -}}
{{- $_ := set $api "keys_file" "/etc/zonemta/api-keys/keys.yaml" -}}
{{- end -}}
{{- $_ := set $config "api" $api -}}
{{- if or .Values.dkim.existingSecret .Values.dkim.keys -}}
{{- $dkim := get $config "dkim" | default dict -}}
{{- $_ := set $dkim "key_dir" "/etc/zonemta/dkim" -}}
{{- $_ := set $config "dkim" $dkim -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every container. */}}
{{- define "zonemta.env" -}}
- name: ZMTA_CONFIG_FILE
  value: /etc/zonemta/zonemta.yaml
{{- if .Values.postgresql.enabled }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.auth.existingSecret | default (printf "%s-postgresql" .Release.Name) }}
      key: password
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled }}
- name: ZMTA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret | default (printf "%s-redis" .Release.Name) }}
      key: redis-password
- name: ZMTA_DBS__REDIS
  value: {{ printf "redis://:$(ZMTA_REDIS_PASSWORD)@%s-redis-master:6379/3" .Release.Name | quote }}
{{- end }}
{{- if .Values.dbs.existingSecret }}
{{- $bundled := dict "postgres" .Values.postgresql.enabled "redis" .Values.redis.enabled "nats" .Values.nats.enabled }}
{{- range $store := list "postgres" "redis" "nats" }}
{{- if not (get $bundled $store) }}
- name: ZMTA_DBS__{{ upper $store }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.dbs.existingSecret }}
      key: {{ $store }}
      optional: true
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod annotations: config checksum (a new config rolls the pods) and Prometheus scraping. */}}
{{- define "zonemta.podAnnotations" -}}
checksum/config: {{ include "zonemta.config" .root | sha256sum }}
{{- if and .root.Values.metrics.podAnnotations .port }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every pod mounts: the config and a writable /tmp. */}}
{{- define "zonemta.volumes" -}}
- name: config
  configMap:
    name: {{ include "zonemta.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "zonemta.volumeMounts" -}}
- name: config
  mountPath: /etc/zonemta/zonemta.yaml
  subPath: zonemta.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Probes on a health endpoint: (dict "port" name-or-number). */}}
{{- define "zonemta.probes" -}}
readinessProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  initialDelaySeconds: 3
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  initialDelaySeconds: 15
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{/* Seconds a service gets for a clean stop: the pod's grace period less 5 s (at least 1). */}}
{{- define "zonemta.shutdownGrace" -}}
{{- max 1 (sub (int .) 5) -}}
{{- end -}}
