from tests.kubeapi.fixtures import kube, kube_server  # noqa: F401
