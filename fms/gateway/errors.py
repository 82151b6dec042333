"""S3 errors: the code, its HTTP status and the XML body S3 sends (Code, Message, Key,
BucketName, Resource, RequestId)."""

from typing import Any
from xml.sax.saxutils import escape

STATUS = {
    "AccessDenied": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BadDigest": 400,
    "BucketAlreadyExists": 409,
    "BucketAlreadyOwnedByYou": 409,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NoSuchVersion": 404,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
}


class S3Error(Exception):
    """An S3 error reply.  ``status`` defaults to the code's (see :data:`STATUS`)."""

    def __init__(self, code: str, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, 400)
        self.extra = extra  # e.g. Key, BucketName: added to the XML body
        self.headers: dict[str, str] = {}  # sent with the reply (e.g. an InvalidRange's)

    def xml(self, resource: str, request_id: str) -> bytes:
        fields = {"Code": self.code, "Message": self.message, **self.extra}
        fields["Resource"] = resource
        fields["RequestId"] = request_id
        body = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields.items() if v is not None)
        return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{body}</Error>'.encode()
