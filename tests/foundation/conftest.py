import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model's converted checkpoint (pulled once into the user cache)."""
    from nbtune.assets import pull_model

    return pull_model("smollm2-135m-instruct", quiet=True)
