{{/* The image every container runs. */}}
{{- define "wpy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels of a component; the selector labels are the first two, as in deploy/base. */}}
{{- define "wpy.labels" -}}
app.kubernetes.io/name: whereabouts-py
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "wpy.chartLabels" -}}
{{ include "wpy.labels" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "wpy.platform" -}}
{{- $p := .Values.platform -}}
{{- if not (has $p (list "upstream" "k3s" "openshift")) -}}
{{- fail (printf "platform: %q is not one of upstream, k3s, openshift" $p) -}}
{{- end -}}
{{- $p -}}
{{- end -}}

{{/* The node's CNI plugin directory. */}}
{{- define "wpy.cniBinDir" -}}
{{- $p := include "wpy.platform" . -}}
{{- .Values.hostPaths.cniBinDir | default (get (dict "upstream" "/opt/cni/bin" "k3s" "/var/lib/rancher/k3s/data/cni" "openshift" "/var/lib/cni/bin") $p) -}}
{{- end -}}

{{/* The node's CNI configuration directory (whereabouts.d lives in it). */}}
{{- define "wpy.cniConfDir" -}}
{{- $p := include "wpy.platform" . -}}
{{- $d := .Values.hostPaths.cniConfDir | default (get (dict "upstream" "/etc/cni/net.d" "k3s" "/etc/cni/net.d" "openshift" "/etc/kubernetes/cni/net.d") $p) -}}
{{- if not (has $d (list "/etc/cni/net.d" "/etc/kubernetes/cni/net.d")) -}}
{{- fail (printf "hostPaths.cniConfDir: %q is not a directory the plugin searches for its flat file (/etc/cni/net.d or /etc/kubernetes/cni/net.d)" $d) -}}
{{- end -}}
{{- $d -}}
{{- end -}}
