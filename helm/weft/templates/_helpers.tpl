{{/* Labels on every object. */}}
{{- define "weft.labels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels of one component: include "weft.selector" (list . "controller"). */}}
{{- define "weft.selector" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "weft.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end }}

{{- define "weft.image" -}}
{{- printf "%s:%s" .Values.images.weft (include "weft.tag" .) -}}
{{- end }}

{{- define "weft.proxyImage" -}}
{{- printf "%s:%s" .Values.images.proxy (include "weft.tag" .) -}}
{{- end }}

{{/* The webhook's serving certificate Secret (written by the controller or cert-manager). */}}
{{- define "weft.webhookTLSSecret" -}}weft-webhook-tls{{- end }}

{{/* Security context of every control-plane container. */}}
{{- define "weft.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "weft.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Injection settings: webhook/src/inject.rs `InjectConfig` (camelCase), read at start (a checksum annotation rolls the webhook when they change). */}}
{{- define "weft.injectConfig" -}}
{
  "version": {{ .Chart.AppVersion | toJson }},
  "proxyImage": {{ include "weft.proxyImage" . | toJson }},
  "initImage": {{ include "weft.image" . | toJson }},
  "proxyUid": {{ .Values.proxy.uid | int64 }},
  "bootstrapConfigMap": "weft-bootstrap",
  "rootCaConfigMap": "weft-root-ca",
  "proxyCpuRequest": {{ .Values.proxy.resources.requests.cpu | toString | toJson }},
  "proxyMemoryRequest": {{ .Values.proxy.resources.requests.memory | toString | toJson }},
  "proxyMemoryLimit": {{ .Values.proxy.resources.limits.memory | toString | toJson }},
  "drainSeconds": {{ .Values.proxy.drainSeconds | int64 }},
  "legacySidecar": {{ .Values.proxy.legacySidecar | toJson }},
  "failClosed": {{ .Values.webhook.failClosed | toJson }}
}
{{- end }}

{{/* The Grafana dashboard ConfigMap: `<release>-weft-dashboard` (release-scoped: it may live in Grafana's namespace beside other releases'). */}}
{{- define "weft.dashboardName" -}}
{{- printf "%s-weft-dashboard" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}
