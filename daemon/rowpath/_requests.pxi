# Requests of _fast.pyx (included): a good row's JSON body, its HMAC-SHA256 signatures
# over prepared key states, and the whole request as transport frames it (see pure.Requests).

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
