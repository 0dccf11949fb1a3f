# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled row path: the same interface and bytes as pure.py, with the per-row work
(cutting lines, checking and splitting them, the JSON body, HMAC-SHA256, base64, the
request framing, the WAL record and its CRC) done in C.

Every rule stays pure.py's: where a rule is subtle (quoted fields, Unicode whitespace
around an id, duplicate data column names) this code calls the reference instead of
copying it. tests/test_rowpath.py proves the two byte-identical.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.object cimport PyObject
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy

import hashlib
import time

import orjson

from .. import chunker
from ..payload import secret_key
from .span import REJECT_HEAD, Batch


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)

cdef extern from "openssl/sha.h" nogil:
    # Deprecated in OpenSSL 3 in favour of EVP, still exported; its context is a plain
    # struct, so a key's pad states are copied by assignment (EVP_MD_CTX_copy allocates).
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int n)


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


# ------------------------------------------------------------------ signing

cdef const char* B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef int put_b64_32(Buf* b, const unsigned char* d) except -1:
    """Standard base64 with padding of a 32-byte digest: 44 characters."""
    cdef int i, o = 0
    cdef unsigned int v
    buf_room(b, 44)
    cdef char* out = b.p + b.n
    for i in range(0, 30, 3):
        v = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2]
        out[o] = B64[(v >> 18) & 63]
        out[o + 1] = B64[(v >> 12) & 63]
        out[o + 2] = B64[(v >> 6) & 63]
        out[o + 3] = B64[v & 63]
        o += 4
    v = (d[30] << 16) | (d[31] << 8)
    out[40] = B64[(v >> 18) & 63]
    out[41] = B64[(v >> 12) & 63]
    out[42] = B64[(v >> 6) & 63]
    out[43] = b'='
    b.n += 44
    return 0


cdef class Requests:
    """How a good row becomes request bytes under one config (see pure.Requests)."""

    cdef readonly bytes head
    cdef readonly str message
    cdef bytes _message_json
    cdef SHA256_CTX* _pads  # 2 per secret: the states after key^ipad and after key^opad
    cdef int _nsec
    cdef Buf _body
    cdef Buf _out
    # The per-second parts of a batch's time, cached as Payloads does.
    cdef long long _sec
    cdef bytes _iso_prefix
    cdef bytes _ts_bytes

    def __cinit__(self, bytes head, secrets, str message):
        cdef int i, j
        cdef bytes k
        cdef unsigned char block[64]
        self._pads = NULL
        self._body.p = NULL
        self._out.p = NULL
        keys = [secret_key(s) for s in secrets]  # raises on a bad secret, like Payloads
        self.head = head
        self.message = message
        self._message_json = json_bytes(message)
        self._nsec = len(keys)
        self._pads = <SHA256_CTX*>malloc(sizeof(SHA256_CTX) * 2 * max(1, self._nsec))
        if self._pads == NULL:
            raise MemoryError()
        for i in range(self._nsec):
            k = keys[i]
            if len(k) > 64:  # RFC 2104: a long key is hashed first
                k = hashlib.sha256(k).digest()
            for j in range(64):
                block[j] = (<unsigned char>k[j] if j < len(k) else 0) ^ 0x36
            SHA256_Init(&self._pads[2 * i])
            SHA256_Update(&self._pads[2 * i], block, 64)
            for j in range(64):
                block[j] ^= 0x36 ^ 0x5C
            SHA256_Init(&self._pads[2 * i + 1])
            SHA256_Update(&self._pads[2 * i + 1], block, 64)
        buf_init(&self._body, 1024)
        buf_init(&self._out, 2048)
        self._sec = -1

    def __dealloc__(self):
        free(self._pads)
        free(self._body.p)
        free(self._out.p)

    cdef int _tick(self, double now) except -1:
        cdef long long sec = <long long>now
        if sec != self._sec:
            t = time.gmtime(sec)
            self._iso_prefix = ("%04d-%02d-%02dT%02d:%02d:%02d" % t[:6]).encode()
            self._ts_bytes = str(sec).encode()
            self._sec = sec
        return 0

    cdef bytes _build(self, bytes job, bytes name_json, long long off,
                      const unsigned char* uid, Py_ssize_t uid_n,
                      const unsigned char* msg, Py_ssize_t msg_n, bytes msg_json,
                      object fields, double now):
        """One request; msg_json, when given, is the message already as a JSON string."""
        cdef Buf* b = &self._body
        cdef Buf* o = &self._out
        cdef int ms, i
        cdef Py_ssize_t pos = 0
        cdef PyObject* k
        cdef PyObject* v
        cdef bint first
        cdef unsigned char inner[32]
        cdef unsigned char outer[32]
        cdef SHA256_CTX ctx
        cdef char digits[24]
        cdef int nd
        self._tick(now)
        # The same float steps as Payloads.build: _MILLIS[int((now - sec) * 1000.0)].
        ms = <int>((now - <double>self._sec) * 1000.0)
        b.n = 0
        put(b, b'{"type":"alert","timestamp":"', 29)
        put_bytes(b, self._iso_prefix)
        buf_room(b, 5)
        b.p[b.n] = b'.'
        b.p[b.n + 1] = <char>(48 + ms // 100)
        b.p[b.n + 2] = <char>(48 + ms // 10 % 10)
        b.p[b.n + 3] = <char>(48 + ms % 10)
        b.p[b.n + 4] = b'Z'
        b.n += 5
        put(b, b'","data":{"user_id":', 20)
        put_json(b, uid, uid_n)
        put(b, b',"message":', 11)
        if msg_json is not None:
            put_bytes(b, msg_json)
        else:
            put_json(b, msg, msg_n)
        put(b, b',"file":', 8)
        put_bytes(b, name_json)
        put(b, b',"offset":', 10)
        put_int(b, off)
        if fields is not None:
            put(b, b',"fields":{', 11)
            first = True
            while PyDict_Next(fields, &pos, &k, &v):
                if not first:
                    put(b, b',', 1)
                first = False
                put_json_str(b, <str>k)
                put(b, b':', 1)
                put_json_str(b, <str>v)
            put(b, b'}', 1)
        put(b, b'}}', 2)

        o.n = 0
        put_bytes(o, self.head)
        put_int(o, b.n)
        put(o, b'\r\nwebhook-id: ', 14)
        put_bytes(o, job)
        put(o, b':', 1)
        put_int(o, off)
        put(o, b'\r\nwebhook-timestamp: ', 21)
        put_bytes(o, self._ts_bytes)
        if self._nsec:
            nd = fmt_int(digits, off)  # the id's offset, signed as "job:off.ts.body"
            put(o, b'\r\nwebhook-signature: ', 21)
            for i in range(self._nsec):
                ctx = self._pads[2 * i]
                SHA256_Update(&ctx, PyBytes_AS_STRING(job), PyBytes_GET_SIZE(job))
                SHA256_Update(&ctx, b":", 1)
                SHA256_Update(&ctx, digits + nd, 24 - nd)
                SHA256_Update(&ctx, b".", 1)
                SHA256_Update(&ctx, PyBytes_AS_STRING(self._ts_bytes),
                              PyBytes_GET_SIZE(self._ts_bytes))
                SHA256_Update(&ctx, b".", 1)
                SHA256_Update(&ctx, b.p, b.n)
                SHA256_Final(inner, &ctx)
                ctx = self._pads[2 * i + 1]
                SHA256_Update(&ctx, inner, 32)
                SHA256_Final(outer, &ctx)
                put(o, b" v1," if i else b"v1,", 4 if i else 3)
                put_b64_32(o, outer)
        put(o, b'\r\n\r\n', 4)
        put(o, b.p, b.n)
        return PyBytes_FromStringAndSize(o.p, o.n)

    def build(self, str job, str name, long long offset, str uid, str msg, fields,
              double now) -> bytes:
        """The request of one alert sent at `now` (a retry re-signs with its own time)."""
        cdef Py_ssize_t un, mn
        cdef const char* u = PyUnicode_AsUTF8AndSize(uid, &un)
        cdef const char* m = PyUnicode_AsUTF8AndSize(msg, &mn)
        return self._build(job.encode(), json_bytes(name), offset, <const unsigned char*>u, un,
                           <const unsigned char*>m, mn, None, fields, now)


# ------------------------------------------------------------------ rows of a span

cdef class RowBatcher:
    """The rows of one span, cut, parsed and built a batch at a time (see pure.RowBatcher)."""

    cdef bytes _data
    cdef const unsigned char* _p
    cdef Py_ssize_t _n
    cdef Py_ssize_t _pos
    cdef long long _base
    cdef object _layout
    cdef bytes _job
    cdef bytes _name_json
    cdef object _done
    cdef bint _has_done
    cdef unsigned char _delim
    cdef Py_ssize_t _ncols, _id, _msg, _max_id, _max_line
    cdef bint _has_fields, _rest
    cdef tuple _data_columns
    cdef Py_ssize_t* _cells  # (start, end) of each cell of the current line
    cdef Py_ssize_t _cells_cap

    def __cinit__(self, bytes data, long long data_offset, layout, str job, str name,
                  done=frozenset()):
        self._cells = NULL
        self._data = data
        self._p = <const unsigned char*>PyBytes_AS_STRING(data)
        self._n = PyBytes_GET_SIZE(data)
        self._pos = 0
        self._base = data_offset
        self._layout = layout
        self._job = job.encode()
        self._name_json = json_bytes(name)
        self._done = done
        self._has_done = len(done) > 0
        if len(layout.delimiter) != 1:  # config allows one ASCII character only
            raise ValueError(f"rowpath: delimiter must be one byte, got {layout.delimiter!r}")
        self._delim = layout.delimiter[0]
        self._ncols = layout.ncols
        self._id = layout.id_index
        self._msg = layout.msg_index
        self._max_id = layout.max_id_length
        self._max_line = layout.max_line_bytes
        self._has_fields = layout.has_fields
        self._rest = layout.data_rest
        self._data_columns = tuple(layout.data_columns)
        self._cells_cap = 64
        self._cells = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * 2 * self._cells_cap)
        if self._cells == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._cells)

    @property
    def exhausted(self) -> bool:
        """Every line of the span has been through next()."""
        return self._pos >= self._n

    cdef Py_ssize_t _split(self, Py_ssize_t s, Py_ssize_t e) except -1:
        """Cells of p[s:e] at the delimiter into _cells; their count."""
        cdef const unsigned char* p = self._p
        cdef const unsigned char* q
        cdef Py_ssize_t nc = 0, a = s
        cdef Py_ssize_t* cells
        while True:
            if nc == self._cells_cap:
                cells = <Py_ssize_t*>realloc(self._cells, sizeof(Py_ssize_t) * 4 * self._cells_cap)
                if cells == NULL:
                    raise MemoryError()
                self._cells = cells
                self._cells_cap *= 2
            q = <const unsigned char*>memchr(p + a, self._delim, e - a)
            self._cells[2 * nc] = a
            if q == NULL:
                self._cells[2 * nc + 1] = e
                return nc + 1
            self._cells[2 * nc + 1] = q - p
            nc += 1
            a = q - p + 1

    cdef str _cell(self, Py_ssize_t i):
        cdef Py_ssize_t a = self._cells[2 * i]
        return PyUnicode_DecodeUTF8(<const char*>self._p + a, self._cells[2 * i + 1] - a, NULL)

    def next(self, Requests requests, double now, Py_ssize_t max_lines=256) -> Batch:
        """The next `max_lines` lines of the span (fewer at its end), with every good
        row's request signed at `now`."""
        cdef const unsigned char* p = self._p
        cdef const unsigned char* q
        cdef const unsigned char* line
        cdef const unsigned char* up
        cdef const unsigned char* mp = NULL
        cdef Py_ssize_t n = self._n, start, end, ln, nc, lines = 0, us, ue, un, mn = 0, i
        cdef Py_ssize_t need
        cdef long long off
        cdef bint ascii
        cdef bytes msg_json
        b = Batch()
        offsets, uids, msgs, fieldss, reqs, rejects = \
            b.offsets, b.uids, b.msgs, b.fields, b.requests, b.rejects
        if max_lines < 1:
            max_lines = 1
        while self._pos < n and lines < max_lines:
            start = self._pos
            q = <const unsigned char*>memchr(p + start, 10, n - start)
            end = n if q == NULL else q - p
            self._pos = n if q == NULL else end + 1
            if end > start and p[end - 1] == 13:
                end -= 1
            lines += 1
            off = self._base + start
            if self._has_done and off in self._done:
                continue
            ln = end - start
            line = p + start
            if ln == 0:
                rejects.append((off, "empty line", b""))
                continue
            if self._max_line and ln > self._max_line:
                rejects.append((off, f"line too long: {ln} bytes > max_line_bytes "
                                     f"{self._max_line}",
                                PyBytes_FromStringAndSize(<const char*>line, min(ln, REJECT_HEAD))))
                continue
            ascii = all_ascii(line, ln)
            if not ascii and not valid_utf8(line, ln):
                rejects.append((off, "invalid UTF-8", self._head(line, ln)))
                continue
            if memchr(line, 0, ln) != NULL:
                rejects.append((off, "NUL byte in row", self._head(line, ln)))
                continue
            if memchr(line, 34, ln) != NULL:
                # Quoted fields: the reference parser (csv) decides, and its messages stay.
                lb = PyBytes_FromStringAndSize(<const char*>line, ln)
                fields = None
                try:
                    if self._has_fields:
                        uid, msg, fields = chunker.parse_fields(lb, self._layout)
                    else:
                        uid, msg = chunker.parse(lb, self._layout)
                except chunker.BadRow as e:
                    rejects.append((off, e.reason, lb[:REJECT_HEAD]))
                    continue
                if msg is None:
                    msg = requests.message
                offsets.append(off)
                uids.append(uid)
                msgs.append(msg)
                fieldss.append(fields)
                reqs.append(self._request(requests, off, uid, msg, fields, now))
                continue
            nc = self._split(start, end)
            if self._ncols:
                if nc != self._ncols:
                    rejects.append((off, f"expected {self._ncols} columns, got {nc}",
                                    self._head(line, ln)))
                    continue
            elif nc <= self._id or nc <= self._msg:
                need = max(self._id, self._msg) + 1
                rejects.append((off, f"expected at least {need} columns, got {nc}",
                                self._head(line, ln)))
                continue
            us, ue = self._cells[2 * self._id], self._cells[2 * self._id + 1]
            if ascii or all_ascii(p + us, ue - us):
                while us < ue and ascii_space(p[us]):
                    us += 1
                while ue > us and ascii_space(p[ue - 1]):
                    ue -= 1
                up, un = p + us, ue - us
                uid = PyUnicode_DecodeUTF8(<const char*>up, un, NULL)
            else:  # str.strip() knows every Unicode space
                uid = self._cell(self._id).strip()
                up = <const unsigned char*>PyUnicode_AsUTF8AndSize(uid, &un)
            if un == 0:
                rejects.append((off, "missing user id", self._head(line, ln)))
                continue
            if un > self._max_id:
                rejects.append((off, f"user id longer than {self._max_id} bytes",
                                self._head(line, ln)))
                continue
            if self._msg >= 0:
                mp = p + self._cells[2 * self._msg]
                mn = self._cells[2 * self._msg + 1] - self._cells[2 * self._msg]
                msg = PyUnicode_DecodeUTF8(<const char*>mp, mn, NULL)
                msg_json = None
            else:
                msg = requests.message
                msg_json = requests._message_json
            fields = None
            if self._has_fields:
                fields = {}
                if self._rest:
                    for i in range(nc):
                        if i != self._id and i != self._msg:
                            fields[str(i)] = self._cell(i)
                else:
                    need = 0
                    for name, i in self._data_columns:
                        if i >= nc:
                            need = max(c for _, c in self._data_columns) + 1
                            break
                        fields[name] = self._cell(i)
                    if need:
                        rejects.append((off, f"expected at least {need} columns, got {nc}",
                                        self._head(line, ln)))
                        continue
            offsets.append(off)
            uids.append(uid)
            msgs.append(msg)
            fieldss.append(fields)
            reqs.append(requests._build(self._job, self._name_json, off, up, un, mp, mn,
                                        msg_json, fields, now))
        return b

    cdef bytes _head(self, const unsigned char* line, Py_ssize_t ln):
        return PyBytes_FromStringAndSize(<const char*>line, min(ln, REJECT_HEAD))

    cdef bytes _request(self, Requests requests, long long off, str uid, str msg, fields,
                        double now):
        cdef Py_ssize_t un, mn
        cdef const char* u = PyUnicode_AsUTF8AndSize(uid, &un)
        cdef const char* m = PyUnicode_AsUTF8AndSize(msg, &mn)
        return requests._build(self._job, self._name_json, off, <const unsigned char*>u, un,
                               <const unsigned char*>m, mn, None, fields, now)


# ------------------------------------------------------------------ WAL records

def encode_wal_rows(str job, long long ck, rows, ts) -> bytes:
    """The WAL records of a batch of row outcomes (see pure.encode_wal_rows)."""
    cdef Buf out, rec
    cdef unsigned long crc
    cdef bytes ts_json = orjson.dumps(ts)  # the float exactly as wal.encode_row writes it
    cdef bytes job_json = json_bytes(job)
    buf_init(&out, 4096)
    try:
        buf_init(&rec, 512)
    except MemoryError:
        free(out.p)
        raise
    try:
        for off, outcome, st, att, dup, uid, err in rows:
            rec.n = 0
            put(&rec, b'{"job":', 7)
            put_bytes(&rec, job_json)
            put(&rec, b',"ck":', 6)
            put_int(&rec, ck)
            put(&rec, b',"off":', 7)
            put_int(&rec, off)
            put(&rec, b',"out":', 7)
            put_json_str(&rec, outcome)
            put(&rec, b',"st":', 6)
            put_int(&rec, st)
            if err is not None:
                put(&rec, b',"err":', 7)
                put_json_str(&rec, err)
            put(&rec, b',"att":', 7)
            put_int(&rec, att)
            if dup is True:
                put(&rec, b',"dup":true', 11)
            elif dup is False:
                put(&rec, b',"dup":false', 12)
            else:
                put(&rec, b',"dup":', 7)
                put_bytes(&rec, orjson.dumps(dup))
            put(&rec, b',"uid":', 7)
            put_json_str(&rec, uid)
            put(&rec, b',"ts":', 6)
            put_bytes(&rec, ts_json)
            put(&rec, b'}', 1)
            crc = crc32(0, <const unsigned char*>rec.p, <unsigned int>rec.n)
            put(&out, rec.p, rec.n - 1)
            put(&out, b',"crc":', 7)
            put_int(&out, <long long>crc)
            put(&out, b'}\n', 2)
        return PyBytes_FromStringAndSize(out.p, out.n)
    finally:
        free(out.p)
        free(rec.p)
