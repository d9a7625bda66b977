"""The real API server tier: a real etcd and kube-apiserver on loopback (see kube.py)."""
