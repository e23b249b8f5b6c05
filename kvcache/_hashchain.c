/* Native fast path of kvcache.hashing.chain: one xxh3-128 call per block, no Python objects
 * but the keys. Links against the system libxxhash (libxxhash.so.0, XXH3 ABI of xxHash 0.8);
 * when that library is absent the extension is not built and the pure-Python loop is used.
 * Keys are written in xxHash's canonical form (high 64 bits big-endian, then low 64 bits),
 * the same bytes as xxhash.xxh3_128_digest, so both paths give identical keys. */
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

static PyObject *chain(PyObject *self, PyObject *args) {
    Py_buffer parent, content;
    Py_ssize_t width;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*n", &parent, &content, &width)) return NULL;
    PyObject *keys = NULL;
    unsigned char *buf = NULL;
    if (parent.len != KEY_BYTES || width <= 0) {
        PyErr_Format(PyExc_ValueError, "parent must be %d bytes and width > 0 (got %zd, %zd)",
                     KEY_BYTES, parent.len, width);
        goto done;
    }
    Py_ssize_t n = content.len / width;
    keys = PyList_New(n);
    buf = PyMem_Malloc((size_t)(KEY_BYTES + width));
    if (keys == NULL || buf == NULL) {
        Py_CLEAR(keys);
        if (buf == NULL) PyErr_NoMemory();
        goto done;
    }
    memcpy(buf, parent.buf, KEY_BYTES);
    const unsigned char *src = (const unsigned char *)content.buf;
    for (Py_ssize_t i = 0; i < n; ++i) {
        memcpy(buf + KEY_BYTES, src + i * width, (size_t)width);
        kv_hash128 h = XXH3_128bits(buf, (size_t)(KEY_BYTES + width));
        PyObject *key = PyBytes_FromStringAndSize(NULL, KEY_BYTES);
        if (key == NULL) {
            Py_CLEAR(keys);
            goto done;
        }
        unsigned char *k = (unsigned char *)PyBytes_AS_STRING(key);
        put_be64(k, h.high64);
        put_be64(k + 8, h.low64);
        PyList_SET_ITEM(keys, i, key);
        memcpy(buf, k, KEY_BYTES); /* this key is the next block's parent */
    }
done:
    PyMem_Free(buf);
    PyBuffer_Release(&parent);
    PyBuffer_Release(&content);
    return keys;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS, "chain(parent, content, width) -> list of 16-byte keys"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashchain", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hashchain(void) { return PyModule_Create(&module); }
