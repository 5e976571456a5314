/* The code cipher's Feistel network (coupon/domain/codes.py) in C: the same permutation,
 * bit for bit, without the Python calls around each compression.
 *
 * Each round function is keyed BLAKE2b (RFC 7693) of the 4-byte big-endian half, with the
 * round's salt and the cipher's personalization, digest size 4, read as a big-endian
 * number. In Python every round is a copy, an update and a digest of a hashlib object,
 * three calls and three allocations around one compression; here the state after the key
 * block is kept per round and each round is that one compression.
 *
 * codes.py uses this module where it is built (tools/build_feistel.py, run by `just setup`
 * and the image build) and its own rounds otherwise; the tests check that both give the
 * same codes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ROUNDS 8
#define HALF_BITS 30
#define HALF_MASK ((UINT64_C(1) << HALF_BITS) - 1)
#define BLOCK 128

static const uint64_t IV[8] = {
    UINT64_C(0x6a09e667f3bcc908), UINT64_C(0xbb67ae8584caa73b),
    UINT64_C(0x3c6ef372fe94f82b), UINT64_C(0xa54ff53a5f1d36f1),
    UINT64_C(0x510e527fade682d1), UINT64_C(0x9b05688c2b3e6c1f),
    UINT64_C(0x1f83d9abfb41bd6b), UINT64_C(0x5be0cd19137e2179),
};

/* RFC 7693, 2.7: the message schedule; round r uses SIGMA[r % 10]. */
static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64_le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

#define G(a, b, c, d, x, y)              \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = rotr64(v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = rotr64(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 63);  \
    } while (0)

/* RFC 7693, 3.2: compress one 128-byte block (as 16 little-endian words) into h. */
static void compress(uint64_t h[8], const uint64_t m[16], uint64_t counter, int last)
{
    uint64_t v[16];
    memcpy(v, h, sizeof(uint64_t) * 8);
    memcpy(v + 8, IV, sizeof IV);
    v[12] ^= counter; /* the high word of the 128-bit counter stays 0 here */
    if (last) {
        v[14] = ~v[14];
    }
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r % 10];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

/* The same for the last block of a 4-byte message: only its first word is not zero, so
 * every round is written out and the zero words' additions fold away. */
#define W(i) ((i) == 0 ? m0 : 0)
#define ROUND(r)                                                        \
    G(0, 4, 8, 12, W(SIGMA[(r) % 10][0]), W(SIGMA[(r) % 10][1]));                     \
    G(1, 5, 9, 13, W(SIGMA[(r) % 10][2]), W(SIGMA[(r) % 10][3]));                     \
    G(2, 6, 10, 14, W(SIGMA[(r) % 10][4]), W(SIGMA[(r) % 10][5]));                    \
    G(3, 7, 11, 15, W(SIGMA[(r) % 10][6]), W(SIGMA[(r) % 10][7]));                    \
    G(0, 5, 10, 15, W(SIGMA[(r) % 10][8]), W(SIGMA[(r) % 10][9]));                    \
    G(1, 6, 11, 12, W(SIGMA[(r) % 10][10]), W(SIGMA[(r) % 10][11]));                  \
    G(2, 7, 8, 13, W(SIGMA[(r) % 10][12]), W(SIGMA[(r) % 10][13]));                   \
    G(3, 4, 9, 14, W(SIGMA[(r) % 10][14]), W(SIGMA[(r) % 10][15]))

static inline void compress_last_word(uint64_t h[8], uint64_t m0, uint64_t counter)
{
    uint64_t v[16];
    memcpy(v, h, sizeof(uint64_t) * 8);
    memcpy(v + 8, IV, sizeof IV);
    v[12] ^= counter;
    v[14] = ~v[14];
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
    for (int i = 0; i < 8; i++) {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

#define SYMBOLS 64
#define CODE_LENGTH 10

typedef struct {
    PyObject_HEAD
    /* Per round: the state once the key block is compressed. */
    uint64_t keyed[ROUNDS][8];
    /* The code alphabet, a symbol per 6 bits (encode); has_alphabet 0: none given. */
    Py_UCS2 alphabet[SYMBOLS];
    int has_alphabet;
} FeistelObject;

/* One round function: keyed BLAKE2b of `half` as 4 big-endian bytes, digest size 4,
 * read big-endian and cut to a half. */
static inline uint64_t round_function(const uint64_t keyed[8], uint64_t half)
{
    uint64_t h[8];
    memcpy(h, keyed, sizeof h);
    /* Bytes b0..b3 = half big-endian, loaded as a little-endian word. */
    uint64_t m0 = ((half >> 24) & 0xff) | (((half >> 16) & 0xff) << 8) |
                  (((half >> 8) & 0xff) << 16) | ((half & 0xff) << 24);
    compress_last_word(h, m0, BLOCK + 4);
    /* The digest is h[0]'s first four bytes, little-endian; read big-endian. */
    uint64_t d = h[0];
    uint64_t value = ((d & 0xff) << 24) | (((d >> 8) & 0xff) << 16) | (((d >> 16) & 0xff) << 8) |
                     ((d >> 24) & 0xff);
    return value & HALF_MASK;
}

static int
Feistel_init(FeistelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "person", "alphabet", NULL};
    Py_buffer key, person;
    PyObject *alphabet = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*|U", kwlist, &key, &person, &alphabet)) {
        return -1;
    }
    self->has_alphabet = 0;
    if (alphabet != NULL) {
        int fits = PyUnicode_GET_LENGTH(alphabet) == SYMBOLS;
        for (Py_ssize_t i = 0; fits && i < SYMBOLS; i++) {
            Py_UCS4 symbol = PyUnicode_READ_CHAR(alphabet, i);
            fits = symbol <= 0xFFFF;
            self->alphabet[i] = (Py_UCS2)symbol;
        }
        if (!fits) {
            PyBuffer_Release(&key);
            PyBuffer_Release(&person);
            PyErr_SetString(PyExc_ValueError, "alphabet must be 64 characters of the BMP");
            return -1;
        }
        self->has_alphabet = 1;
    }
    int ok = key.len >= 1 && key.len <= 64 && person.len <= 16;
    if (ok) {
        uint8_t block[BLOCK];
        uint64_t m[16];
        memset(block, 0, sizeof block);
        memcpy(block, key.buf, (size_t)key.len);
        for (int i = 0; i < 16; i++) {
            m[i] = load64_le(block + 8 * i);
        }
        for (int r = 0; r < ROUNDS; r++) {
            /* RFC 7693 2.5: the parameter block, xored into the IV. */
            uint8_t param[64];
            memset(param, 0, sizeof param);
            param[0] = 4;                 /* digest length */
            param[1] = (uint8_t)key.len;  /* key length */
            param[2] = 1;                 /* fanout */
            param[3] = 1;                 /* depth */
            param[32] = (uint8_t)r;       /* salt: one byte, the round, zero-padded */
            memcpy(param + 48, person.buf, (size_t)person.len);
            for (int i = 0; i < 8; i++) {
                self->keyed[r][i] = IV[i] ^ load64_le(param + 8 * i);
            }
            compress(self->keyed[r], m, BLOCK, 0);
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&person);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "key must be 1 to 64 bytes, person at most 16");
        return -1;
    }
    return 0;
}

static int
read_value(PyObject *arg, uint64_t *out)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (value >> (2 * HALF_BITS)) {
        PyErr_SetString(PyExc_ValueError, "value must be in [0, 2**60)");
        return -1;
    }
    *out = (uint64_t)value;
    return 0;
}

static uint64_t
permute(const FeistelObject *self, uint64_t value)
{
    uint64_t left = value >> HALF_BITS, right = value & HALF_MASK;
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t next = left ^ round_function(self->keyed[r], right);
        left = right;
        right = next;
    }
    return (left << HALF_BITS) | right;
}

static PyObject *
Feistel_forward(FeistelObject *self, PyObject *arg)
{
    uint64_t value;
    if (read_value(arg, &value) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(permute(self, value));
}

/* codes.py's encode: the permutation written as ten symbols, the highest 6 bits first. */
static PyObject *
Feistel_encode(FeistelObject *self, PyObject *arg)
{
    if (!self->has_alphabet) {
        PyErr_SetString(PyExc_TypeError, "encode needs the Feistel made with an alphabet");
        return NULL;
    }
    int overflow = 0;
    long long given = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (given == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow || given < 0 || ((uint64_t)given >> (2 * HALF_BITS))) {
        PyErr_Format(PyExc_ValueError, "sequence must be in [0, 2**60) (got %S)", arg);
        return NULL;
    }
    uint64_t value = permute(self, (uint64_t)given);
    Py_UCS2 code[CODE_LENGTH];
    for (int i = CODE_LENGTH - 1; i >= 0; i--) {
        code[i] = self->alphabet[value & (SYMBOLS - 1)];
        value >>= 6;
    }
    return PyUnicode_FromKindAndData(PyUnicode_2BYTE_KIND, code, CODE_LENGTH);
}

static PyObject *
Feistel_backward(FeistelObject *self, PyObject *arg)
{
    uint64_t value;
    if (read_value(arg, &value) < 0) {
        return NULL;
    }
    uint64_t left = value >> HALF_BITS, right = value & HALF_MASK;
    for (int r = ROUNDS - 1; r >= 0; r--) {
        uint64_t previous = right ^ round_function(self->keyed[r], left);
        right = left;
        left = previous;
    }
    return PyLong_FromUnsignedLongLong((left << HALF_BITS) | right);
}

static PyMethodDef Feistel_methods[] = {
    {"forward", (PyCFunction)Feistel_forward, METH_O,
     "The permutation of a 60-bit value (encode's number before it becomes text)."},
    {"backward", (PyCFunction)Feistel_backward, METH_O, "The inverse of forward."},
    {"encode", (PyCFunction)Feistel_encode, METH_O,
     "A sequence number in [0, 2**60) as its code: forward, ten symbols of the alphabet."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FeistelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "coupon.domain._feistel.Feistel",
    .tp_basicsize = sizeof(FeistelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Feistel(key, person, alphabet=None): the code cipher's 8-round network under "
              "one key (encode needs the alphabet).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Feistel_init,
    .tp_methods = Feistel_methods,
};

static struct PyModuleDef feistel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "coupon.domain._feistel",
    .m_doc = "The code cipher's Feistel network (see codes.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__feistel(void)
{
    if (PyType_Ready(&FeistelType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&feistel_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&FeistelType);
    if (PyModule_AddObject(module, "Feistel", (PyObject *)&FeistelType) < 0) {
        Py_DECREF(&FeistelType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
