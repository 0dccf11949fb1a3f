# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: libraries = crypto
# distutils: extra_compile_args = -O2 -Wno-deprecated-declarations
"""Compiled hot path of the fast engine: the plain alert POSTs of one read, in C.

Hot.feed() serves, from the start of a read, every complete request that is a
plain alert: `POST <path> HTTP/1.1`, every header line exactly `Name: value`
(a token, one space, no trailing blank), no Transfer-Encoding, Connection,
Proxy-Connection, Expect or Upgrade, at most one Content-Length. Those are
requests httptools reads the same way, so the verdict (signature, unique or
duplicate id, status 200/401) and the counters are those of Core.answer().
It stops at the first request it does not take: fast.py hands that one, from its
first byte, to httptools and the full Python path. A signature it cannot confirm
is judged by Core.signature_ok(), so a refusal means exactly what it means there.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append
from cpython.set cimport PySet_Add, PySet_Contains
from libc.string cimport memcmp, memcpy


cdef extern from "openssl/sha.h" nogil:
    # Deprecated in OpenSSL 3, still exported; a plain struct, so a key's pad states
    # are copied by assignment (as in alertd's row path).
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef extern from "time.h" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    int CLOCK_REALTIME


cdef enum:
    MAX_KEYS = 16
    MAX_HEAD = 8192  # a longer head goes to httptools, which has its own rules
    SIG_B64 = 44     # base64 of a 32-byte digest, padded

cdef const char* B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# tchar of RFC 9110: the bytes a header name may hold.
cdef unsigned char TOKEN[256]
cdef int _i
for _i in range(256):
    TOKEN[_i] = 0
for _c in list(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"):
    TOKEN[_c] = 1
# Request-target bytes taken here: unreserved, sub-delims, ":@/?%" (llhttp takes more).
cdef unsigned char TARGET[256]
for _i in range(256):
    TARGET[_i] = 0
for _c in list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"):
    TARGET[_c] = 1


cdef inline bint _name_is(const unsigned char* p, Py_ssize_t n, const char* low, Py_ssize_t ln) noexcept:
    """Header name p[:n] equals the lower-case `low` (ASCII case-insensitive)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != ln:
        return False
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>low[i]:
            return False
    return True


cdef inline bint _path_is(const unsigned char* p, Py_ssize_t n, const char* path, Py_ssize_t ln) noexcept:
    # The path is the target up to "?", as fast.py routes it.
    return n >= ln and memcmp(p, path, ln) == 0 and (n == ln or p[ln] == 63)


@cython.auto_pickle(False)
cdef class Hot:
    """The keys' pad states and the answers; feed() is called once per read."""

    cdef SHA256_CTX _ipad[MAX_KEYS]
    cdef SHA256_CTX _opad[MAX_KEYS]
    cdef int _nkeys
    cdef Py_ssize_t _max_body
    cdef bytes _ok
    cdef bytes _bad
    cdef public bint incomplete  # feed() stopped at a request not all here yet

    def __init__(self, keys: list, int max_body, bytes ok, bytes bad) -> None:
        """keys: the raw HMAC keys (Core.key_bytes); ok/bad: the 200 and 401 answers."""
        cdef unsigned char block[64]
        cdef unsigned char digest[32]
        cdef bytes k
        cdef Py_ssize_t n, j
        cdef SHA256_CTX c
        if len(keys) > MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} secrets on the compiled path")
        self._nkeys = len(keys)
        for i, k in enumerate(keys):
            n = PyBytes_GET_SIZE(k)
            for j in range(64):
                block[j] = 0
            if n > 64:
                SHA256_Init(&c)
                SHA256_Update(&c, PyBytes_AS_STRING(k), n)
                SHA256_Final(digest, &c)
                memcpy(block, digest, 32)
            else:
                memcpy(block, PyBytes_AS_STRING(k), n)
            for j in range(64):
                block[j] ^= 0x36
            SHA256_Init(&self._ipad[i])
            SHA256_Update(&self._ipad[i], block, 64)
            for j in range(64):
                block[j] ^= 0x36 ^ 0x5C
            SHA256_Init(&self._opad[i])
            SHA256_Update(&self._opad[i], block, 64)
        self._max_body = max_body
        self._ok = ok
        self._bad = bad
        self.incomplete = False

    cdef bint _signed(self, const unsigned char* mid, Py_ssize_t mn, const unsigned char* ts,
                      Py_ssize_t tn, const unsigned char* sig, Py_ssize_t sn,
                      const unsigned char* body, Py_ssize_t bn) noexcept:
        """A `v1,` item of the header is the canonical base64 of one key's HMAC."""
        cdef SHA256_CTX c
        cdef unsigned char inner[32]
        cdef unsigned char digest[32]
        cdef unsigned char enc[MAX_KEYS][SIG_B64]
        cdef int k
        cdef Py_ssize_t i, j, start
        cdef unsigned int v
        for k in range(self._nkeys):
            c = self._ipad[k]
            SHA256_Update(&c, mid, mn)
            SHA256_Update(&c, b".", 1)
            SHA256_Update(&c, ts, tn)
            SHA256_Update(&c, b".", 1)
            SHA256_Update(&c, body, bn)
            SHA256_Final(inner, &c)
            c = self._opad[k]
            SHA256_Update(&c, inner, 32)
            SHA256_Final(digest, &c)
            j = 0
            for i in range(0, 30, 3):
                v = (digest[i] << 16) | (digest[i + 1] << 8) | digest[i + 2]
                enc[k][j] = B64[v >> 18]
                enc[k][j + 1] = B64[(v >> 12) & 63]
                enc[k][j + 2] = B64[(v >> 6) & 63]
                enc[k][j + 3] = B64[v & 63]
                j += 4
            v = (digest[30] << 16) | (digest[31] << 8)
            enc[k][40] = B64[v >> 18]
            enc[k][41] = B64[(v >> 12) & 63]
            enc[k][42] = B64[(v >> 6) & 63]
            enc[k][43] = 61  # "="
        start = 0
        while start < sn:
            i = start
            while i < sn and sig[i] != 32:
                i += 1
            if (i - start == 3 + SIG_B64 and sig[start] == 118 and sig[start + 1] == 49
                    and sig[start + 2] == 44):
                for k in range(self._nkeys):
                    if memcmp(sig + start + 3, enc[k], SIG_B64) == 0:
                        return True
            start = i + 1
        return False

    def feed(self, bytes buf, object core, list out):
        """Serve the plain alerts at the start of `buf`, append their answers to `out`,
        count them in `core`; the offset of the first request not served (len(buf): all).
        `incomplete` then tells whether that request only lacks bytes."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t pos = 0, i, line, name_end, vs, ve, head_end, tgt, tgt_end, cl, end
        cdef const unsigned char* mid
        cdef const unsigned char* ts
        cdef const unsigned char* sig
        cdef Py_ssize_t mn, tn, sn
        cdef bint has_cl, ok
        cdef unsigned char c
        cdef long received = 0, good = 0, bad = 0, dups = 0
        cdef object ids = core.ids
        cdef bytes key
        cdef timespec now
        self.incomplete = False
        while pos < n:
            # Request line: POST, a target of plain bytes, HTTP/1.1.
            # A partial request is awaited only while its bytes can still become a plain alert.
            if memcmp(p + pos, b"POST /", min(6, n - pos)) != 0:
                break
            if n - pos < 6:
                self.incomplete = True
                break
            i = pos + 5
            tgt = i
            while i < n and TARGET[p[i]]:
                i += 1
            tgt_end = i
            if i + 11 > n:
                self.incomplete = (i - pos < MAX_HEAD
                                   and memcmp(p + i, b" HTTP/1.1\r\n", n - i) == 0)
                break
            if memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
                break
            if (_path_is(p + tgt, tgt_end - tgt, b"/stats", 6)
                    or _path_is(p + tgt, tgt_end - tgt, b"/control", 8)
                    or _path_is(p + tgt, tgt_end - tgt, b"/reset", 6)):
                break
            line = i + 11
            mid = ts = sig = NULL
            mn = tn = sn = 0
            has_cl = False
            cl = 0
            ok = True
            head_end = -1
            # Header lines, each exactly "Name: value\r\n", then an empty line.
            while True:
                if line - pos > MAX_HEAD:
                    ok = False
                    break
                if line + 2 > n:
                    break
                if p[line] == 13:
                    if p[line + 1] != 10:
                        ok = False
                    else:
                        head_end = line + 2
                    break
                i = line
                while i < n and TOKEN[p[i]]:
                    i += 1
                name_end = i
                if i + 3 > n:
                    break
                if i == line or p[i] != 58 or p[i + 1] != 32 or not (33 <= p[i + 2] <= 126):
                    ok = False
                    break
                vs = i + 2
                i = vs
                while i < n:
                    c = p[i]
                    if not (32 <= c <= 126 or c == 9):
                        break
                    i += 1
                if i + 2 > n:
                    break
                if p[i] != 13 or p[i + 1] != 10 or p[i - 1] == 32 or p[i - 1] == 9:
                    ok = False
                    break
                ve = i
                c = p[line] | 32
                if c == 119:  # w
                    if mid == NULL and _name_is(p + line, name_end - line, b"webhook-id", 10):
                        mid, mn = p + vs, ve - vs
                    elif sig == NULL and _name_is(p + line, name_end - line, b"webhook-signature", 17):
                        sig, sn = p + vs, ve - vs
                    elif ts == NULL and _name_is(p + line, name_end - line, b"webhook-timestamp", 17):
                        ts, tn = p + vs, ve - vs
                elif c == 99:  # c
                    if _name_is(p + line, name_end - line, b"content-length", 14):
                        if has_cl or ve - vs > 9:
                            ok = False
                            break
                        has_cl = True
                        for i in range(vs, ve):
                            if not (48 <= p[i] <= 57):
                                ok = False
                                break
                            cl = cl * 10 + (p[i] - 48)
                        if not ok:
                            break
                    elif _name_is(p + line, name_end - line, b"connection", 10):
                        ok = False
                        break
                elif c == 116 or c == 101 or c == 117 or c == 112:  # t e u p
                    if (_name_is(p + line, name_end - line, b"transfer-encoding", 17)
                            or _name_is(p + line, name_end - line, b"expect", 6)
                            or _name_is(p + line, name_end - line, b"upgrade", 7)
                            or _name_is(p + line, name_end - line, b"proxy-connection", 16)):
                        ok = False
                        break
                line = ve + 2
            if not ok or cl > self._max_body:
                break
            if head_end < 0:
                self.incomplete = n - pos <= MAX_HEAD
                break
            end = head_end + cl
            if end > n:
                self.incomplete = True
                break
            # The verdict, as Core.answer() gives it in mode "ok" without latency.
            received += 1
            if self._nkeys:
                if sn == 0:
                    ok = False
                elif not self._signed(mid, mn, ts, tn, sig, sn, p + head_end, cl):
                    ok = core.signature_ok(
                        PyBytes_FromStringAndSize(<const char*>mid, mn),
                        PyBytes_FromStringAndSize(<const char*>ts, tn),
                        PyBytes_FromStringAndSize(<const char*>sig, sn),
                        PyBytes_FromStringAndSize(<const char*>p + head_end, cl))
            if ok:
                good += 1
                key = PyBytes_FromStringAndSize(<const char*>mid, mn)
                if PySet_Contains(ids, key):
                    dups += 1
                else:
                    PySet_Add(ids, key)
                PyList_Append(out, self._ok)
            else:
                bad += 1
                PyList_Append(out, self._bad)
            pos = end
        if received:
            clock_gettime(CLOCK_REALTIME, &now)
            t = now.tv_sec + now.tv_nsec * 1e-9
            if core.first_at is None:
                core.first_at = t
            core.last_at = t
            core.received += received
            by_status = core.by_status
            if good:
                core.duplicates += dups
                by_status[200] = by_status.get(200, 0) + good
            if bad:
                core.bad_signatures += bad
                by_status[401] = by_status.get(401, 0) + bad
        return pos
