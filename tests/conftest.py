import pytest
from hypothesis import HealthCheck, settings

from tests.cni_exec import use_opt_in_flat_file
from tests.kubeapi.fixtures import apiserver, k8s, kube, kube_server, real_kube  # noqa: F401
from tests.kubeapi.real import ASSETS_ENV, assets_dir

# The suites configure data_dir, datastore, kubeconfig and log_file per test in the network config:
# run them as a single-tenant node that opted in (tests/test_security.py uses strict flat files).
use_opt_in_flat_file()

# Hypothesis' timing checks judge wall time, which these shared 2-core machines move by 10x under load:
# no test may fail on time (bench/ measures speed), so the suite turns both off.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

REAL_FIXTURES = {"apiserver", "real_kube"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the real API server; without KUBEBUILDER_ASSETS deselect them."""
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.apiserver)
    if assets_dir() is not None:
        return
    real = [item for item in items if item.get_closest_marker("apiserver")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("apiserver")]
    config.stash[_NOT_RUN] = len(real)


_NOT_RUN = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    skipped = config.stash.get(_NOT_RUN, 0)
    if skipped:
        terminalreporter.write_line(
            f"real-API tier did not run: {ASSETS_ENV} is unset ({skipped} tests deselected; "
            "see docs/development.md, 'Testing against a real kube-apiserver')"
        )
