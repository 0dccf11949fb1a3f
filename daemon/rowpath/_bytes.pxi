# The byte-level helpers of _fast.pyx (included, not a module of its own): a growable
# buffer, integers and JSON strings as orjson writes them, UTF-8 and ASCII checks, base64.
# Must stay free of any rule about rows: those live in pure.py and _fast.pyx.

# ------------------------------------------------------------------ a growable buffer

cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int buf_init(Buf* b, Py_ssize_t cap) except -1:
    b.p = <char*>malloc(cap)
    if b.p == NULL:
        raise MemoryError()
    b.n = 0
    b.cap = cap
    return 0


cdef int buf_room(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef char* p
    if b.n + extra <= cap:
        return 0
    while cap < b.n + extra:
        cap *= 2
    p = <char*>realloc(b.p, cap)
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef inline int put(Buf* b, const char* s, Py_ssize_t n) except -1:
    if b.n + n > b.cap:
        buf_room(b, n)
    memcpy(b.p + b.n, s, n)
    b.n += n
    return 0


cdef inline int put_bytes(Buf* b, bytes s) except -1:
    return put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int fmt_int(char* tmp, long long v) noexcept nogil:
    """v in decimal at the end of tmp[24]; the index of its first character."""
    cdef int i = 24
    cdef unsigned long long u = <unsigned long long>(-v) if v < 0 else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        tmp[i] = b'-'
    return i


cdef int put_int(Buf* b, long long v) except -1:
    cdef char tmp[24]
    cdef int i = fmt_int(tmp, v)
    return put(b, tmp + i, 24 - i)


cdef const char* HEX = b"0123456789abcdef"


cdef int put_json(Buf* b, const unsigned char* s, Py_ssize_t n) except -1:
    """A JSON string as orjson writes it: only '"', '\\' and controls escaped, UTF-8 kept."""
    cdef Py_ssize_t i, start = 0
    cdef unsigned char c
    buf_room(b, n + 2)
    b.p[b.n] = b'"'
    b.n += 1
    for i in range(n):
        c = s[i]
        if c >= 0x20 and c != 34 and c != 92:
            continue
        put(b, <const char*>s + start, i - start)
        start = i + 1
        buf_room(b, 6)
        b.p[b.n] = b'\\'
        if c == 34 or c == 92:
            b.p[b.n + 1] = <char>c
            b.n += 2
        elif c == 10:
            b.p[b.n + 1] = b'n'
            b.n += 2
        elif c == 13:
            b.p[b.n + 1] = b'r'
            b.n += 2
        elif c == 9:
            b.p[b.n + 1] = b't'
            b.n += 2
        elif c == 8:
            b.p[b.n + 1] = b'b'
            b.n += 2
        elif c == 12:
            b.p[b.n + 1] = b'f'
            b.n += 2
        else:
            memcpy(b.p + b.n + 1, b"u00", 3)
            b.p[b.n + 4] = HEX[c >> 4]
            b.p[b.n + 5] = HEX[c & 15]
            b.n += 6
    put(b, <const char*>s + start, n - start)
    put(b, b'"', 1)
    return 0


cdef int put_json_str(Buf* b, str s) except -1:
    cdef Py_ssize_t n
    cdef const char* u = PyUnicode_AsUTF8AndSize(s, &n)
    return put_json(b, <const unsigned char*>u, n)


cdef bytes json_bytes(str s):
    cdef Buf b
    buf_init(&b, 64)
    try:
        put_json_str(&b, s)
        return PyBytes_FromStringAndSize(b.p, b.n)
    finally:
        free(b.p)


# ------------------------------------------------------------------ bytes checks

cdef bint valid_utf8(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 (Unicode table 3-7): exactly what bytes.decode("utf-8") accepts."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, lo, hi
    cdef int k, j
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo, hi = 0x80, 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif c == 0xE0:
            k, lo = 2, 0xA0
        elif 0xE1 <= c <= 0xEC or c == 0xEE or c == 0xEF:
            k = 2
        elif c == 0xED:
            k, hi = 2, 0x9F
        elif c == 0xF0:
            k, lo = 3, 0x90
        elif 0xF1 <= c <= 0xF3:
            k = 3
        elif c == 0xF4:
            k, hi = 3, 0x8F
        else:
            return False
        if i + k >= n:
            return False
        if not (lo <= s[i + 1] <= hi):
            return False
        for j in range(2, k + 1):
            if not (0x80 <= s[i + j] <= 0xBF):
                return False
        i += k + 1
    return True


cdef inline bint all_ascii(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] >= 0x80:
            return False
    return True


cdef inline bint ascii_space(unsigned char c) noexcept nogil:
    # str.isspace() for ASCII: \t \n \v \f \r, the separators \x1c-\x1f, and space.
    return c == 32 or 9 <= c <= 13 or 28 <= c <= 31
