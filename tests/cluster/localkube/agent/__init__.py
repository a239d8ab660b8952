"""The node agent: what a kubelet, kube-proxy and an ingress controller would do, done as
local processes on this machine so the control plane has somewhere to run pods."""
