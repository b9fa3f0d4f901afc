"""Why the transport refuses something: one exception type shared by the server and the client.

On the wire a refusal is a gRPC status code plus a serialized `Refusal` message in the trailing
metadata key ``worldlm-refusal-bin``; `Refused.from_rpc_error` turns it back into this exception.
"""

from __future__ import annotations

import grpc

from worldlm_secure.errors import TransportError
from worldlm_secure.transport import federation_pb2 as pb

REFUSAL_METADATA_KEY = "worldlm-refusal-bin"

R = pb.RefusalReason
_STATUS: dict[int, grpc.StatusCode] = {
    R.REFUSAL_UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    R.REFUSAL_UNTRUSTED_CERTIFICATE: grpc.StatusCode.UNAUTHENTICATED,
    R.REFUSAL_CERTIFICATE_EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    R.REFUSAL_NOT_IN_ROSTER: grpc.StatusCode.PERMISSION_DENIED,
    R.REFUSAL_SENDER_MISMATCH: grpc.StatusCode.PERMISSION_DENIED,
    R.REFUSAL_BAD_SIGNATURE: grpc.StatusCode.PERMISSION_DENIED,
    R.REFUSAL_NOT_ENROLLED: grpc.StatusCode.PERMISSION_DENIED,
    R.REFUSAL_MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    R.REFUSAL_VERSION: grpc.StatusCode.INVALID_ARGUMENT,
    R.REFUSAL_REPLAY: grpc.StatusCode.ALREADY_EXISTS,
    R.REFUSAL_STALE: grpc.StatusCode.FAILED_PRECONDITION,
    R.REFUSAL_WRONG_ROUND: grpc.StatusCode.FAILED_PRECONDITION,
    R.REFUSAL_REJECTED: grpc.StatusCode.FAILED_PRECONDITION,
    R.REFUSAL_TRUNCATED: grpc.StatusCode.DATA_LOSS,
    R.REFUSAL_INTEGRITY: grpc.StatusCode.DATA_LOSS,
    R.REFUSAL_OVERSIZED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    R.REFUSAL_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    R.REFUSAL_OVER_QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # NOT_FOUND rather than UNAVAILABLE: clients retry UNAVAILABLE, and "no model yet" is an answer.
    R.REFUSAL_UNAVAILABLE: grpc.StatusCode.NOT_FOUND,
}


class Refused(TransportError):
    """A request, peer or payload was refused; ``reason`` is a `RefusalReason` value."""

    def __init__(self, reason: int, detail: str) -> None:
        self.reason = int(reason)
        self.detail = " ".join(detail.split())  # one line, always
        super().__init__(f"refused ({self.reason_name}): {self.detail}")

    @property
    def reason_name(self) -> str:
        """The enum name without its prefix, e.g. ``REPLAY``."""
        try:
            return R.Name(self.reason).removeprefix("REFUSAL_")
        except ValueError:
            return f"UNKNOWN_{self.reason}"

    @property
    def status_code(self) -> grpc.StatusCode:
        return _STATUS.get(self.reason, grpc.StatusCode.FAILED_PRECONDITION)

    def to_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((REFUSAL_METADATA_KEY, pb.Refusal(reason=self.reason, detail=self.detail).SerializeToString()),)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "Refused | None":
        """The refusal a server attached to ``err``, or None for transport-level failures."""
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == REFUSAL_METADATA_KEY and isinstance(value, bytes):
                try:
                    msg = pb.Refusal.FromString(value)
                except Exception:  # a garbled refusal is still a refusal; keep the status text
                    return cls(R.REFUSAL_REASON_UNSPECIFIED, str(err.details() if hasattr(err, "details") else err))
                return cls(msg.reason, msg.detail)
        return None
