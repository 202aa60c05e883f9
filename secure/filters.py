"""The NVFlare filter a site pins in its own ``privacy.json`` scope: nothing leaves unprotected.

Protection itself happens in the job's privacy pipeline (:mod:`medsilo.secure.pipeline`), which the site's
executor runs for every upload; this filter is the site's independent check at NVFlare's boundary, whatever a
job configures. It runs on every task result of the site — every data kind and return code, and results that
are not DXOs at all — and lets a result through only when

* it carries no tensors (evaluation replies, errors), or
* its tensors are exactly one medsilo wire (:mod:`medsilo.secure.upload`) signed as this site, protected under
  a privacy mode that applies everything the site's ``required_mode`` demands.

(Metadata — evaluation figures, training loss — is the executor's, ledgered before it leaves; this filter
does not read it.)

Anything else is replaced by an error reply that names the reason; the server learns nothing of the result.
Each result it checks is recorded in the site's NVFlare job audit log (``applied filter: ProtectedOnly@site``).
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply

from medsilo.config.common import PRIVACY_STRENGTH
from medsilo.secure.upload import WIRE_PARAM, Wire, WireError


def outgoing_problem(data: dict, site: str, required_mode: str) -> str | None:
    """Why a task result with tensors ``data`` must not leave ``site`` under ``required_mode`` (``None``: it may)."""
    if not data:
        return None
    if set(data) != {WIRE_PARAM}:
        return f"its tensors {sorted(data)[:4]} are not one protected upload"
    try:
        statement = Wire.from_bytes(data[WIRE_PARAM]).statement
    except WireError as e:
        return str(e)
    if statement.site != site:
        return f"the upload is signed as {statement.site!r}"
    if statement.mode not in PRIVACY_STRENGTH or not PRIVACY_STRENGTH[required_mode] <= PRIVACY_STRENGTH[statement.mode]:
        return f"it was protected under privacy mode {statement.mode!r}; this site requires {required_mode!r}"
    return None


class ProtectedOnly(DXOFilter):
    """Site task-result filter (module docstring).

    Args:
        required_mode: the site's least privacy mode (``none``, ``dp``, ``ckks``, ``ckks+dp``).

    Raises:
        ValueError: an unknown mode (the site's scope is misconfigured; NVFlare then refuses to start the job).
    """

    def __init__(self, required_mode: str = "none"):
        kinds = [getattr(DataKind, k) for k in dir(DataKind) if k.isupper()]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        if required_mode not in PRIVACY_STRENGTH:
            # the value is not repeated: NVFlare may have expanded a party's environment into it
            raise ValueError(f"required_mode: must be one of {', '.join(PRIVACY_STRENGTH)}")
        self.required_mode = required_mode  # attribute name must equal the argument name for NVFlare's job export

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Check every result: NVFlare's DXO filter would pass results with another return code, or that are
        not DXOs, unchecked."""
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: only an empty reply (headers alone) may pass
            dxo = None
        if dxo is None:
            if set(shareable) - {ReservedHeaderKey.HEADERS}:
                return self._stopped(fl_ctx, "it is not a medsilo reply")
            return shareable
        if shareable.get_return_code() != ReturnCode.OK and dxo.data:
            return self._stopped(fl_ctx, "an error reply carries tensors")
        if dxo.data_kind == DataKind.COLLECTION:
            return self._stopped(fl_ctx, "a collection of results is not a medsilo reply")
        return super().process(shareable, fl_ctx)

    def _stopped(self, fl_ctx: FLContext, problem: str) -> Shareable:
        reason = f"site {fl_ctx.get_identity_name()}: a task result was stopped at the site's privacy scope: {problem}"
        self.log_error(fl_ctx, reason)
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return DXO(DataKind.WEIGHTS, data={}, meta={"error": reason}).update_shareable(reply)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        site = fl_ctx.get_identity_name()
        problem = outgoing_problem(dxo.data or {}, site, self.required_mode)
        if problem is None:
            return dxo  # unchanged; returning it records "applied filter: ProtectedOnly@site" in the job audit log
        reason = f"site {site}: a task result was stopped at the site's privacy scope: {problem}"
        self.log_error(fl_ctx, reason)
        return DXO(dxo.data_kind, data={}, meta={"error": reason})
