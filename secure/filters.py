"""NVFlare filters for privacy mode ``ckks``: encrypt what a site uploads, decrypt what it receives.

Wiring (the job builder adds them for ``ckks`` jobs; a hospital can also pin them in its
``local/privacy.json`` scope so encryption holds whatever a job author configures)::

    site  train result  ──CKKSEncryptor──▶  {"__ckks__": Contribution bytes}  ──▶ server adds ciphertexts
    site  train / evaluate task data  ◀──CKKSDecryptor──  {"__ckks__": EncryptedUpload bytes} (aggregate)

**CKKSEncryptor** (task result filter on ``train``) packs *every* tensor of the upload — parameters ×
n, prototype sums, per-class counts, ``n`` — into one CKKS vector set (:func:`medsilo.secure.ckks.encrypt`),
signs its digest with the site's key, bound to ``<job id>/round-<r>`` (a
:class:`~medsilo.secure.release.Contribution`), writes the upload's ``release`` entry to the site's
privacy ledger (prepared by the executor, with the SHA-256 of these bytes; see
:func:`medsilo.secure.guard.commit_encrypted_upload`), and replaces the upload with them. Only the
layout (tensor names and shapes) stays readable. A reply that carries an error, or no tensors, passes
through unchanged. The reply's metadata keeps the site's evaluation metrics and training loss (the
server needs them for model selection; ``docs/threat-model.md`` lists them as what still leaks) but
loses ``n_train``.

**CKKSDecryptor** (task data filter on ``train`` and ``evaluate``) turns an encrypted aggregate back
into plaintext tensors with the site's secret context, and writes a ``decrypt`` entry (the aggregate's
digest and size, never values) to the site's privacy ledger. Payloads the server computed in plaintext
(after an aggregate release) pass through.

Both load their keys once per process through :mod:`medsilo.secure.keys` and fail closed: a missing
or wrong key file stops the task with a message naming the file.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from medsilo.errors import MedsiloError
from medsilo.secure.guard import commit_encrypted_upload, site_ledger

CKKS_PARAM = "__ckks__"
"""The single entry of an encrypted payload: uint8 bytes of a Contribution (up) or EncryptedUpload (down)."""
FILTER_ERROR = "filter_error"
"""Task-data metadata set when decryption failed; the executor reports it instead of training."""
LEAKY_META = ("n_train",)
"""Reply metadata an encrypted upload must not carry in plaintext."""


def round_tag(job_id: str, rnd: int) -> str:
    """What a contribution's signature binds it to: the job and the round."""
    return f"{job_id}/round-{rnd}"


def _workspace(fl_ctx: FLContext) -> str:
    """The site's workspace root, as the executor sees it (same ledger file for both)."""
    root = fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT)
    if root:
        return root
    ws = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    return ws.get_root_dir() if ws is not None else "."


def _applies(tasks: list[str] | None, shareable: Shareable, fl_ctx: FLContext) -> bool:
    """Whether a filter limited to ``tasks`` acts on this task (unknown task name: it acts — fail closed)."""
    if tasks is None:
        return True
    name = fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedHeaderKey.TASK_NAME)
    return name is None or name in tasks


class CKKSEncryptor(DXOFilter):
    """Site task-result filter: encrypt and sign the upload (see module docstring).

    Args:
        tasks: task names whose results it encrypts (``None``: every task it is attached to). A site's
            ``privacy.json`` scope applies filters to every task, so it lists ``["train"]`` there: the
            ``evaluate`` reply carries no tensors and a ``release`` reply is a released aggregate.
    """

    def __init__(self, tasks: list[str] | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        self.tasks = tasks  # attribute name must equal the argument name for NVFlare's job export
        self._ctx = None
        self._key = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        import torch

        from medsilo.secure import keys
        from medsilo.secure.ckks import encrypt
        from medsilo.secure.release import sign_contribution

        if dxo.get_meta_prop("error") or not dxo.data or not _applies(self.tasks, shareable, fl_ctx):
            return None
        if CKKS_PARAM in dxo.data:
            return None  # already encrypted (the filter is pinned by the site and added by the job)
        site = fl_ctx.get_identity_name()
        try:
            if self._ctx is None:
                self._ctx = keys.site_context(site, _workspace(fl_ctx))
                self._key = keys.signing_key(site, _workspace(fl_ctx))
            tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()}
            enc = encrypt(self._ctx, tensors)
            tag = round_tag(fl_ctx.get_job_id(), int(dxo.get_meta_prop("round", 0)))
            contribution = sign_contribution(site, enc, self._key, tag=tag)
            blob = contribution.to_bytes()
            # the ledger shows the exact bytes that leave; written before they do (fails closed if absent)
            commit_encrypted_upload(site, fl_ctx.get_job_id(), int(dxo.get_meta_prop("round", 0)), blob,
                                    len(enc.ciphertexts))  # fmt: skip
        except MedsiloError as exc:  # fail closed: nothing of the upload leaves, the server learns why
            reason = f"site {site}: cannot encrypt the upload: {exc}"
            self.log_error(fl_ctx, reason)
            return DXO(dxo.data_kind, data={}, meta={"error": reason})
        meta = {k: v for k, v in dxo.meta.items() if k not in LEAKY_META}
        meta["ckks"] = True
        self.log_info(fl_ctx, f"{site}: encrypted {enc.layout.num_values} values into "
                              f"{len(enc.ciphertexts)} ciphertext(s), {enc.nbytes} bytes, tag {tag}")  # fmt: skip
        return DXO(dxo.data_kind, data={CKKS_PARAM: np.frombuffer(blob, dtype=np.uint8)},
                   meta=meta)  # fmt: skip


class CKKSDecryptor(DXOFilter):
    """Site task-data filter: decrypt an encrypted aggregate (plaintext payloads pass through).

    Args:
        tasks: task names whose data it decrypts (``None``: every task it is attached to).
    """

    def __init__(self, tasks: list[str] | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        self.tasks = tasks
        self._ctx = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        from medsilo.secure import keys
        from medsilo.secure.ckks import EncryptedUpload, decrypt

        if not dxo.data or CKKS_PARAM not in dxo.data or not _applies(self.tasks, shareable, fl_ctx):
            return None
        site = fl_ctx.get_identity_name()
        try:
            if self._ctx is None:
                self._ctx = keys.site_context(site, _workspace(fl_ctx))
            enc = EncryptedUpload.from_bytes(dxo.data[CKKS_PARAM])
            plain = decrypt(self._ctx, enc)
            site_ledger(site, _workspace(fl_ctx)).append(
                "decrypt", job=fl_ctx.get_job_id(), round=int(dxo.get_meta_prop("round", 0)),
                what={"kind": "aggregate", "digest": enc.digest(), "values": enc.layout.num_values,
                      "ciphertexts": len(enc.ciphertexts), "encrypted": True}, privacy=None)  # fmt: skip
        except MedsiloError as exc:  # the executor turns this into the task's error reply
            reason = f"site {site}: cannot decrypt the aggregate: {exc}"
            self.log_error(fl_ctx, reason)
            return DXO(dxo.data_kind, data={}, meta={**dxo.meta, FILTER_ERROR: reason})
        data = {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in plain.items()}
        return DXO(dxo.data_kind, data=data, meta=dict(dxo.meta))
