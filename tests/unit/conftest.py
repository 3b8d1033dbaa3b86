"""The app fixtures shared by the tests/unit/test_app*.py modules."""

import pytest

from tests.unit.test_app import ready_app


@pytest.fixture(scope="module")
def app(model_dir):
    """A ready app on the small test model, one per test module."""
    return ready_app(model_dir)


@pytest.fixture
def client(app):
    return app.test_client()
