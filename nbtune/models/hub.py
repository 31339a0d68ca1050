"""A hub model id, checked before anything loads: one request with a short timeout, so that no
network, the hub switched off, a gated model or a misspelled id is one paragraph with the fix,
not transformers' minute of retries and a long traceback.

- ``HF_HUB_OFFLINE=1``: fine when the id is in the local hub cache, else an error at once;
- otherwise one ``auth-check`` request to the hub (``HF_ENDPOINT``), no retries: a gated model
  whose licence this account has not accepted (``GatedRepoError``) says where to accept it and
  how to log in, and names ungated copies as an example; an unknown id (``RepositoryNotFoundError``)
  says it may be private or misspelled; a hub that cannot be reached is an error, unless the id
  is cached, where a line says the cached copy is used.
"""
from __future__ import annotations

import sys

from .loader import ModelLoadError

TIMEOUT_S = 10.0


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def gated_message(repo_id: str, endpoint: str) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    return (f"model.name: {repo_id!r} is a gated model on the hub: its licence must be accepted before it can be "
            f"downloaded. Fix: accept it on {endpoint.rstrip('/')}/{repo_id} (logged in), then log in here with "
            f"`huggingface-cli login` or set HF_TOKEN to a token of that account; or use an ungated copy of the "
            f"same weights, for example a mirror under unsloth/ or NousResearch/ (such as unsloth/{name}), if one "
            "exists")


def check_hub_model(repo_id: str, timeout: float = TIMEOUT_S) -> None:
    """A :class:`ModelLoadError` now when the hub model ``repo_id`` cannot be downloaded (see the
    module docstring); returns when it can, or when it is cached and the hub is off or away."""
    import importlib

    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    cached = _cached(repo_id)
    if constants.is_offline_mode():
        if cached:
            return
        raise ModelLoadError(
            f"model.name: {repo_id!r} is a hub id, but the hub is switched off here (HF_HUB_OFFLINE=1) and the "
            f"model is not in the local hub cache. Fix: download it where there is network (huggingface-cli "
            f"download {repo_id}) into this cache, or give a local checkpoint folder as model.name; or unset "
            "HF_HUB_OFFLINE to download it now")
    endpoint = constants.ENDPOINT
    session = get_session()
    # the hub client's connection errors: httpx's under huggingface_hub 1.x, httpx2's under 2.x
    client = importlib.import_module(type(session).__module__.split(".")[0])
    transport_error = getattr(client, "TransportError", OSError)
    try:
        response = session.get(f"{endpoint}/api/models/{repo_id}/auth-check", headers=build_hf_headers(),
                                     timeout=timeout)
        hf_raise_for_status(response)
    except GatedRepoError:
        raise ModelLoadError(gated_message(repo_id, endpoint)) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model.name: {repo_id!r} is not on the hub ({endpoint}), or is private: check the spelling (org/name); "
            "for a private model log in with `huggingface-cli login` or set HF_TOKEN; or give a local checkpoint "
            "folder") from None
    except (transport_error, HfHubHTTPError) as e:
        why = f"HTTP {e.response.status_code}" if isinstance(e, HfHubHTTPError) and e.response is not None else (
            f"{type(e).__name__}: {e}")
        if cached:
            print(f"nbtune: the hub ({endpoint}) cannot be reached ({why}); using the cached copy of {repo_id} "
                  "(HF_HUB_OFFLINE=1 skips the hub's retries)", file=sys.stderr)
            return
        raise ModelLoadError(
            f"model.name: {repo_id!r} is a hub id, but the hub ({endpoint}) cannot be reached ({why}) and the model "
            f"is not in the local hub cache. Fix: connect to the network (or set HF_ENDPOINT to a reachable "
            f"mirror), or download it elsewhere (huggingface-cli download {repo_id}) and give that folder as "
            "model.name") from None
