{{/* Chart name (app.kubernetes.io/name). */}}
{{- define "partnergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name. Release "partnergate" gives "partnergate". Kept to 40
characters so "<fullname>-connector-material" and friends stay within 63. */}}
{{- define "partnergate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "partnergate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "partnergate.labels" -}}
helm.sh/chart: {{ include "partnergate.chart" . }}
app.kubernetes.io/name: {{ include "partnergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: partnergate
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "partnergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "partnergate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The gateway pods' label selector as the operator's --gateway-selector string. */}}
{{- define "partnergate.gatewaySelector" -}}
{{- printf "app.kubernetes.io/component=gateway,app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "partnergate.name" .) .Release.Name -}}
{{- end -}}

{{- define "partnergate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Names of the objects the operator and the gateways share (docs/interfaces.md). */}}
{{- define "partnergate.connectorsConfigMap" -}}{{ include "partnergate.fullname" . }}-connectors{{- end -}}
{{- define "partnergate.materialSecret" -}}{{ include "partnergate.fullname" . }}-connector-material{{- end -}}
{{- define "partnergate.fleetConfigMap" -}}{{ include "partnergate.fullname" . }}-gateway-fleet{{- end -}}
{{- define "partnergate.gatewayService" -}}{{ include "partnergate.fullname" . }}-gateway{{- end -}}
{{- define "partnergate.tlsSecret" -}}{{ default (printf "%s-gateway-tls" (include "partnergate.fullname" .)) .Values.gateway.tls.secretName }}{{- end -}}
{{- define "partnergate.leaseName" -}}{{ default (printf "%s-operator" (include "partnergate.fullname" .)) .Values.operator.leaseName }}{{- end -}}
{{- define "partnergate.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "partnergate.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "partnergate.gatewayHostname" -}}
{{- default (printf "%s.%s.svc.%s" (include "partnergate.gatewayService" .) .Release.Namespace .Values.clusterDomain) .Values.gateway.settings.hostname -}}
{{- end -}}

{{/* Container security context shared by every container of the chart (section 6). */}}
{{- define "partnergate.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "partnergate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A trust bundle reference {secretName, configMapName, key} -> true when set. */}}
{{- define "partnergate.refSet" -}}
{{- if or .secretName .configMapName -}}true{{- end -}}
{{- end -}}

{{/* Volume source for a trust bundle reference, projecting its key to "ca.crt". */}}
{{- define "partnergate.bundleVolume" -}}
{{- if .ref.secretName -}}
secret:
  secretName: {{ .ref.secretName }}
  items: [{key: {{ .ref.key | quote }}, path: ca.crt}]
{{- else -}}
configMap:
  name: {{ .ref.configMapName }}
  items: [{key: {{ .ref.key | quote }}, path: ca.crt}]
{{- end -}}
{{- end -}}

{{/* The operator's read rules where PartnerConnectors live (operator-rbac.yaml). */}}
{{- define "partnergate.readRules" -}}
- apiGroups: [partnergate.io]
  resources: [partnerconnectors]
  verbs: [get, list, watch]
- apiGroups: [partnergate.io]
  resources: [partnerconnectors/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
