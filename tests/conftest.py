from tests.cni_exec import use_opt_in_flat_file
from tests.kubeapi.fixtures import kube, kube_server  # noqa: F401

# The suites configure data_dir, datastore, kubeconfig and log_file per test in the network config:
# run them as a single-tenant node that opted in (tests/test_security.py uses strict flat files).
use_opt_in_flat_file()
