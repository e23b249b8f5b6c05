/* Native fast paths of kvcache.hashing: the xxh3-128 block chain and the token encoder.
 *
 * chain(parent, content, width) -> [key, ...]: one xxh3-128 call per whole block, chained.
 * chain_blocks(parent, content, width) -> ([key, ...], [block bytes, ...]): the same keys and each
 *     block's own bytes (what a cached block stores to confirm later hits).
 * encode_tokens(list, limit) -> bytes | None: a list of exact Python ints in 0..limit-1 as
 *     little-endian uint32; None when an element is not an exact int (bool, numpy scalar, ...) or
 *     is out of range, so the caller's Python path can name the bad element.
 *
 * Links against the system libxxhash (libxxhash.so.0, XXH3 ABI of xxHash 0.8); when that library
 * is absent the extension is not built and the pure-Python loops are used. Keys are written in
 * xxHash's canonical form (high 64 bits big-endian, then low 64 bits), the same bytes as
 * xxhash.xxh3_128_digest, so both paths give identical keys. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t low64;
    uint64_t high64;
} kv_hash128;

extern kv_hash128 XXH3_128bits(const void *data, size_t len);

#define KEY_BYTES 16

static void put_be64(unsigned char *out, uint64_t v) {
    for (int i = 7; i >= 0; --i) {
        out[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* Fills keys (and contents when not NULL) with n blocks; returns 0, or -1 with an exception set. */
static int chain_into(const Py_buffer *parent, const Py_buffer *content, Py_ssize_t width, Py_ssize_t n,
                      PyObject *keys, PyObject *contents) {
    unsigned char *buf = PyMem_Malloc((size_t)(KEY_BYTES + width));
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(buf, parent->buf, KEY_BYTES);
    const unsigned char *src = (const unsigned char *)content->buf;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const unsigned char *block = src + i * width;
        memcpy(buf + KEY_BYTES, block, (size_t)width);
        kv_hash128 h = XXH3_128bits(buf, (size_t)(KEY_BYTES + width));
        PyObject *key = PyBytes_FromStringAndSize(NULL, KEY_BYTES);
        if (key == NULL) goto fail;
        unsigned char *k = (unsigned char *)PyBytes_AS_STRING(key);
        put_be64(k, h.high64);
        put_be64(k + 8, h.low64);
        PyList_SET_ITEM(keys, i, key);
        if (contents != NULL) {
            PyObject *item = PyBytes_FromStringAndSize((const char *)block, width);
            if (item == NULL) goto fail;
            PyList_SET_ITEM(contents, i, item);
        }
        memcpy(buf, k, KEY_BYTES); /* this key is the next block's parent */
    }
    PyMem_Free(buf);
    return 0;
fail:
    PyMem_Free(buf);
    return -1;
}

static PyObject *chain_impl(PyObject *args, int with_contents) {
    Py_buffer parent, content;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*y*n", &parent, &content, &width)) return NULL;
    PyObject *keys = NULL, *contents = NULL, *result = NULL;
    if (parent.len != KEY_BYTES || width <= 0) {
        PyErr_Format(PyExc_ValueError, "parent must be %d bytes and width > 0 (got %zd, %zd)",
                     KEY_BYTES, parent.len, width);
        goto done;
    }
    Py_ssize_t n = content.len / width;
    keys = PyList_New(n);
    if (keys == NULL) goto done;
    if (with_contents && (contents = PyList_New(n)) == NULL) goto done;
    if (chain_into(&parent, &content, width, n, keys, contents) < 0) goto done;
    if (with_contents) {
        result = PyTuple_Pack(2, keys, contents);
    } else {
        result = keys;
        keys = NULL;
    }
done:
    Py_XDECREF(keys);
    Py_XDECREF(contents);
    PyBuffer_Release(&parent);
    PyBuffer_Release(&content);
    return result;
}

static PyObject *chain(PyObject *self, PyObject *args) {
    (void)self;
    return chain_impl(args, 0);
}

static PyObject *chain_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return chain_impl(args, 1);
}

static PyObject *encode_tokens(PyObject *self, PyObject *args) {
    PyObject *seq;
    unsigned long long limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!K", &PyList_Type, &seq, &limit)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out == NULL) return NULL;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *item = PyList_GET_ITEM(seq, i);
        if (!PyLong_CheckExact(item)) goto reject; /* bool, numpy scalars, floats: Python path */
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow || v < 0 || (unsigned long long)v >= limit) goto reject;
        uint32_t u = (uint32_t)v;
        dst[4 * i] = (unsigned char)u;
        dst[4 * i + 1] = (unsigned char)(u >> 8);
        dst[4 * i + 2] = (unsigned char)(u >> 16);
        dst[4 * i + 3] = (unsigned char)(u >> 24);
    }
    return out;
reject:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS, "chain(parent, content, width) -> list of 16-byte keys"},
    {"chain_blocks", chain_blocks, METH_VARARGS,
     "chain_blocks(parent, content, width) -> (keys, block bytes)"},
    {"encode_tokens", encode_tokens, METH_VARARGS,
     "encode_tokens(list, limit) -> little-endian uint32 bytes, or None if an element is not an "
     "exact int in 0..limit-1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashchain", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hashchain(void) { return PyModule_Create(&module); }
