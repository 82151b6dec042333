"""Reading files straight into data frames: the payload lands behind the reserved bin32 prefix,
so it is never copied again on its way to the socket."""

from . import protocol as p


def read_full(f, view) -> int:
    """Fill ``view`` from the unbuffered file ``f``; :return: bytes read (less only at EOF)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_frame(f, length: int, offset: int | None = None):
    """Read ``length`` bytes (from ``offset``, if given) into a new data frame.

    :return: ``(frame, payload view, bytes actually read)``; a short read means the file shrank.
    """
    frame = p.data_buffer(length)
    view = memoryview(frame)[p.DATA_PREFIX_LEN:]
    if offset is not None:
        f.seek(offset)
    return frame, view, read_full(f, view)
