"""Publishing a finished merge to the Hugging Face Hub: a token check up front, one upload at the very end."""

from __future__ import annotations

from pathlib import Path

from .errors import FisherMaskError


def require_token() -> str:
    """Fail before any work starts if no Hub token is configured."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise FisherMaskError(
            "--push-to-hub needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN. "
            "Nothing was merged."
        )
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str) -> str:
    """Create (or reuse) ``repo_id`` and upload ``folder`` in one commit; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if private and api.repo_info(repo_id, repo_type="model").private is False:
        raise FisherMaskError(
            f"The Hub repo {repo_id} already exists and is public; --private does not change an existing repo, so "
            f"nothing was uploaded (the merge is in {folder}). Make the repo private on the Hub, or push without "
            "--private."
        )
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload merge from mergekit-fisher"
    )
    return str(url)
