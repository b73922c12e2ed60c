from tests.kubeapi.fixtures import kube_api, kubeconfig, kubectl  # noqa: F401
