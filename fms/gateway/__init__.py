"""The S3 gateway and its web console: a client of the broker like the CLI (reads through the
cache tier, writes to storage) that speaks S3 over HTTP.

- ``sigv4``: Signature Version 4 (headers, presigned URLs, aws-chunked bodies);
- ``app``: the S3 operations (aiohttp handlers) and their XML (``xmlio``) and errors;
- ``store``: fms requests from a pool of threads, and the streams to and from the event loop;
- ``credentials``: who may sign: the store's identities' S3 keys (looked up, kept a while)
  and static ones; each request then acts for its key's identity;
- ``console``: the browser console at ``/console``;
- ``server``: the process (``fms s3``).
"""
