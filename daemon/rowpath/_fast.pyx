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


include "_bytes.pxi"


include "_requests.pxi"


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
                                     f"{self._max_line}", self._head(line, ln)))
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
