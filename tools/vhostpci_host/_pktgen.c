/*
 * vhostpci_host._pktgen: the simulated driver VM's per-frame ring work, compiled.
 *
 * A traffic source must not be the bottleneck of what it measures (issue 16): in pure
 * Python the simulator does about the switch's own per-frame work (a TX add and
 * harvest, an RX harvest, check and re-post), so it cannot be three times faster than
 * a pure switch. These functions do that work for a whole batch in one call, on the
 * very state of a vhostpci_driver.virtqueue.driver.DriverQueue (its free stack,
 * tokens, chains and writable lengths, its indexes) and with exactly its rules and
 * messages, so a frontend can mix them with the pure methods freely. The pure
 * versions stay the reference (frontend.py, netpacket.py; tests/unit/test_pktgen.py
 * holds the two to the same bytes, state and counts):
 *
 *   reclaim(q, slots)   DriverQueue.harvest() of a TX queue, each token appended to `slots`;
 *   fill(q, ...)        NetFrontend.send_pktgen: the used TX chains taken back
 *                       (DriverQueue.take_used), those holding this frame stamped with seq,
 *                       length and check and posted again in place (repost), the others
 *                       released, then free slots stamped and added (add_many);
 *   receive(q, ...)     NetFrontend.receive's loop on an RX queue (DriverQueue.take_used,
 *                       NetFrontend._take, repost, publish, until quiet): pktgen frames
 *                       checked here (netpacket.check_pktgen: length, check, every payload
 *                       byte) and counted in the Receiver's own SeqSets, any other frame
 *                       handed to Receiver.take, every buffer posted again as it was.
 *
 * The used ring is written by the device side, which we do not trust: each used
 * element and the used index are loaded once, and checked before they index anything.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F_WRITE 2u
#define HDR 12
#define PAYLOAD_AT 30
#define STAMP_AT (HDR + 14)

static PyObject *free_token; /* virtqueue.driver._FREE */
static PyObject *ring_error; /* errors.RingError */
static PyObject *seqset_type; /* netpacket.SeqSet */

/* -- crc32 (zlib's polynomial, as netpacket computes crc32(dst + src)) --------------------- */

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* netpacket.pktgen_check: the low 32 bits are the same in 64-bit arithmetic */
static uint32_t pktgen_check(uint64_t seq, uint32_t size, uint32_t macs)
{
    return (uint32_t)((seq ^ (seq >> 32)) * 0x9E3779B1ull) ^ size ^ macs;
}

/* -- a DriverQueue's state ------------------------------------------------------------------- */

typedef struct {
    PyObject *q;
    Py_ssize_t size;
    Py_buffer desc, avail, used;
    int have_desc, have_avail, have_used;
    PyObject *free, *tokens, *chains, *wlens; /* borrowed from q's lists, checked to be lists */
    PyObject *free_o, *tokens_o, *chains_o, *wlens_o;
    long avail_idx, last_used_idx;
    long irq_after; /* DriverQueue._irq_after: used_event is kept this far past last_used_idx, less one */
    int event_idx;
} dq_t;

static void dq_done(dq_t *d)
{
    if (d->have_desc)
        PyBuffer_Release(&d->desc);
    if (d->have_avail)
        PyBuffer_Release(&d->avail);
    if (d->have_used)
        PyBuffer_Release(&d->used);
    Py_XDECREF(d->free_o);
    Py_XDECREF(d->tokens_o);
    Py_XDECREF(d->chains_o);
    Py_XDECREF(d->wlens_o);
}

/* An attribute's name as an interned str, made once per name (a call's fixed cost is most of a
 * small batch's: a str built per attribute per call was a fifth of it). `name` is a literal. */
static PyObject *attr_name(const char *name)
{
    static struct {
        const char *c;
        PyObject *s;
    } names[16];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        if (names[i].c == name)
            return names[i].s;
        if (names[i].c == NULL) {
            if ((names[i].s = PyUnicode_InternFromString(name)) == NULL)
                return NULL;
            names[i].c = name;
            return names[i].s;
        }
    }
    PyErr_SetString(PyExc_SystemError, "_pktgen: more attribute names than its table holds");
    return NULL;
}

static PyObject *get_attr(PyObject *o, const char *name)
{
    PyObject *n = attr_name(name);
    return n ? PyObject_GetAttr(o, n) : NULL;
}

static int get_long_attr(PyObject *o, const char *name, long *out)
{
    PyObject *v = get_attr(o, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int get_buf_attr(PyObject *o, const char *name, Py_buffer *b, int *have, Py_ssize_t need)
{
    PyObject *v = get_attr(o, name);
    if (v == NULL)
        return -1;
    int r = PyObject_GetBuffer(v, b, PyBUF_WRITABLE);
    Py_DECREF(v);
    if (r < 0)
        return -1;
    *have = 1;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", name, b->len, need);
        return -1;
    }
    return 0;
}

static int get_list_attr(PyObject *o, const char *name, PyObject **out, Py_ssize_t len)
{
    *out = get_attr(o, name);
    if (*out == NULL)
        return -1;
    if (!PyList_Check(*out) || (len >= 0 && PyList_GET_SIZE(*out) != len)) {
        PyErr_Format(PyExc_TypeError, "DriverQueue.%s is not a list of the ring's size", name);
        return -1;
    }
    return 0;
}

static int dq_open(dq_t *d, PyObject *q)
{
    memset(d, 0, sizeof *d);
    d->q = q;
    long size, event_idx;
    if (get_long_attr(q, "size", &size) < 0 || get_long_attr(q, "avail_idx", &d->avail_idx) < 0 ||
        get_long_attr(q, "last_used_idx", &d->last_used_idx) < 0 || get_long_attr(q, "event_idx", &event_idx) < 0 ||
        get_long_attr(q, "_irq_after", &d->irq_after) < 0)
        return -1;
    if (size < 1 || size > 32768 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two <= 32768");
        return -1;
    }
    d->size = size;
    d->event_idx = event_idx != 0;
    if (get_buf_attr(q, "_desc", &d->desc, &d->have_desc, 16 * size) < 0 ||
        get_buf_attr(q, "_avail", &d->avail, &d->have_avail, 6 + 2 * size) < 0 ||
        get_buf_attr(q, "_used", &d->used, &d->have_used, 6 + 8 * size) < 0)
        return -1;
    if (get_list_attr(q, "_free", &d->free_o, -1) < 0 || get_list_attr(q, "_tokens", &d->tokens_o, size) < 0 ||
        get_list_attr(q, "_chains", &d->chains_o, size) < 0 || get_list_attr(q, "_wlen", &d->wlens_o, size) < 0)
        return -1;
    d->free = d->free_o;
    d->tokens = d->tokens_o;
    d->chains = d->chains_o;
    d->wlens = d->wlens_o;
    return 0;
}

static int set_long_attr(PyObject *o, const char *name, long v)
{
    PyObject *x = PyLong_FromLong(v), *n = attr_name(name);
    if (x == NULL || n == NULL) {
        Py_XDECREF(x);
        return -1;
    }
    int r = PyObject_SetAttr(o, n, x);
    Py_DECREF(x);
    return r;
}

static void raise_ring(const char *rule, PyObject *message, PyObject *index)
{
    if (message == NULL)
        return;
    PyObject *e = PyObject_CallFunction(ring_error, "sOO", rule, message, index ? index : Py_None);
    Py_DECREF(message);
    if (e != NULL) {
        PyErr_SetObject(ring_error, e);
        Py_DECREF(e);
    }
}

/* DriverQueue.add_many(bufs, writable) for n single-buffer chains (addr[k], len, token toks[k]). */
static int dq_add_many(dq_t *d, const uint64_t *addrs, uint32_t len, PyObject *const *toks, Py_ssize_t n,
                       int writable, PyObject *wlen_obj)
{
    if (n > PyList_GET_SIZE(d->free)) {
        raise_ring("ring-full", PyUnicode_FromFormat("%zd descriptors wanted, %zd free", n, PyList_GET_SIZE(d->free)),
                   NULL);
        return -1;
    }
    if (n == 0)
        return 0;
    Py_ssize_t nf = PyList_GET_SIZE(d->free);
    uint16_t heads_small[256], *heads = heads_small;
    if (n > 256 && (heads = PyMem_Malloc(sizeof *heads * (size_t)n)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) { /* heads = [free.pop() for _ in range(n)] */
        long h = PyLong_AsLong(PyList_GET_ITEM(d->free, nf - 1 - k));
        if (h < 0 || h >= d->size) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "free descriptor index out of range");
            if (heads != heads_small)
                PyMem_Free(heads);
            return -1;
        }
        heads[k] = (uint16_t)h;
    }
    if (PyList_SetSlice(d->free, nf - n, nf, NULL) < 0)
        goto fail;
    unsigned char *desc = d->desc.buf;
    uint16_t flags = writable ? F_WRITE : 0, zero = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        long head = heads[k];
        unsigned char *p = desc + 16 * head;
        memcpy(p, &addrs[k], 8);
        memcpy(p + 8, &len, 4);
        memcpy(p + 12, &flags, 2);
        memcpy(p + 14, &zero, 2);
        Py_INCREF(toks[k]);
        PyList_SetItem(d->tokens, head, toks[k]);
        PyObject *ch = PyList_GET_ITEM(d->chains, head);
        /* chains[head] = (head,): the tuple already there is kept when it says so */
        if (!(PyTuple_CheckExact(ch) && PyTuple_GET_SIZE(ch) == 1 && PyLong_CheckExact(PyTuple_GET_ITEM(ch, 0)) &&
              PyLong_AsLong(PyTuple_GET_ITEM(ch, 0)) == head)) {
            PyObject *hv = PyLong_FromLong(head), *t = hv ? PyTuple_Pack(1, hv) : NULL;
            Py_XDECREF(hv);
            if (t == NULL)
                goto fail;
            PyList_SetItem(d->chains, head, t);
        }
        Py_INCREF(wlen_obj);
        PyList_SetItem(d->wlens, head, wlen_obj);
    }
    uint16_t *ring = (uint16_t *)((unsigned char *)d->avail.buf + 4);
    long mask = (long)d->size - 1;
    for (Py_ssize_t k = 0; k < n; k++)
        ring[(d->avail_idx + k) & mask] = heads[k];
    d->avail_idx = (d->avail_idx + (long)n) & 0xFFFF;
    if (heads != heads_small)
        PyMem_Free(heads);
    return set_long_attr(d->q, "avail_idx", d->avail_idx);
fail:
    if (heads != heads_small)
        PyMem_Free(heads);
    return -1;
}

/* DriverQueue.take_used, rule for rule, in two steps: dq_take_check reads and checks every used
 * entry (at most `cap`) and changes nothing; dq_take_commit then moves last_used_idx past them and
 * used_event with it. Heads in heads[], their tokens in toks[] (borrowed: the ring's tokens keep
 * them, the chains stay in flight), their lengths in lens[]; the count, or -1 with an exception
 * set. `taken` is a bitmap of size bits, the batch's heads: one returned twice is not in flight. */
static Py_ssize_t dq_take_check(dq_t *d, PyObject **toks, uint32_t *lens, uint16_t *heads, Py_ssize_t cap,
                                uint64_t *taken)
{
    const unsigned char *used = d->used.buf;
    uint16_t used_idx = __atomic_load_n((const uint16_t *)(used + 2), __ATOMIC_ACQUIRE); /* read once */
    long n = (uint16_t)(used_idx - (uint16_t)d->last_used_idx);
    if (n > d->size || n > (long)(uint16_t)(d->avail_idx - d->last_used_idx)) {
        raise_ring("used-idx",
                   PyUnicode_FromFormat("device claims %ld used entries, %zd descriptors out", n,
                                        d->size - PyList_GET_SIZE(d->free)),
                   NULL);
        return -1;
    }
    if (n == 0)
        return 0;
    if (n > cap)
        n = (long)cap;
    memset(taken, 0, sizeof *taken * (size_t)((d->size + 63) / 64));
    long idx = d->last_used_idx, mask = (long)d->size - 1;
    for (long k = 0; k < n; k++) {
        uint32_t e[2];
        memcpy(e, used + 4 + 8 * (idx & mask), 8); /* one load of the element; only the copy is used */
        __asm__ __volatile__("" ::: "memory");
        uint32_t head = e[0], written = e[1];
        if (head >= (uint32_t)d->size || PyList_GET_ITEM(d->tokens, head) == free_token ||
            (taken[head / 64] >> (head % 64) & 1)) {
            PyObject *h = PyLong_FromUnsignedLong(head);
            if (h != NULL) {
                raise_ring("used-id",
                           PyUnicode_FromFormat("device returned id %lu, which is not in flight", (unsigned long)head),
                           h);
                Py_DECREF(h);
            }
            return -1;
        }
        PyObject *wl = PyList_GET_ITEM(d->wlens, head);
        long long cap_w = PyLong_AsLongLong(wl);
        if (cap_w == -1 && PyErr_Occurred())
            return -1;
        if ((long long)written > cap_w) {
            PyObject *h = PyLong_FromUnsignedLong(head);
            if (h != NULL) {
                raise_ring("used-len",
                           PyUnicode_FromFormat("device wrote %lu bytes into %S", (unsigned long)written, wl), h);
                Py_DECREF(h);
            }
            return -1;
        }
        taken[head / 64] |= 1ull << (head % 64);
        heads[k] = (uint16_t)head;
        toks[k] = PyList_GET_ITEM(d->tokens, head);
        lens[k] = written;
        idx = (idx + 1) & 0xFFFF;
    }
    return n;
}

static int dq_take_commit(dq_t *d, Py_ssize_t n)
{
    if (n == 0)
        return 0; /* nothing moved: no store (the last call of every loop) */
    long idx = (d->last_used_idx + (long)n) & 0xFFFF;
    if (set_long_attr(d->q, "last_used_idx", idx) < 0)
        return -1;
    d->last_used_idx = idx;
    if (d->event_idx) { /* used_event, as harvest puts it (2.7.10) */
        uint16_t ev = (uint16_t)(idx + d->irq_after - 1);
        memcpy((unsigned char *)d->avail.buf + 4 + 2 * d->size, &ev, 2);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* ...visible before the caller re-checks the used index */
    }
    return 0;
}

/* DriverQueue.release(heads[0..n)): chains taken that go back to the free stack, their tokens
 * appended to `slots` (a new reference each) when it is not NULL. */
static int dq_release(dq_t *d, const uint16_t *heads, Py_ssize_t n, PyObject *slots)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *tok = PyList_GET_ITEM(d->tokens, heads[k]);
        Py_INCREF(tok);
        Py_INCREF(free_token);
        PyList_SetItem(d->tokens, heads[k], free_token); /* drops the list's reference to tok */
        int bad = slots != NULL && PyList_Append(slots, tok) < 0;
        Py_DECREF(tok);
        PyObject *ch = PyList_GET_ITEM(d->chains, heads[k]);
        Py_INCREF(ch);
        PyObject *fr = bad ? NULL : PySequence_Fast(ch, "a chain must be a sequence of descriptor indexes");
        Py_DECREF(ch);
        if (fr == NULL)
            return -1;
        for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(fr) && !bad; j++)
            bad = PyList_Append(d->free, PySequence_Fast_GET_ITEM(fr, j)) < 0;
        Py_DECREF(fr);
        if (bad)
            return -1;
    }
    return 0;
}

/* DriverQueue.repost(heads), and publish() when asked: the chains available again as they were,
 * the index stored after the entries (virtio 1.2, 2.7.13: the device may read them once it sees it). */
static int dq_repost_publish(dq_t *d, const uint16_t *heads, Py_ssize_t n, int publish)
{
    uint16_t *ring = (uint16_t *)((unsigned char *)d->avail.buf + 4);
    long mask = (long)d->size - 1;
    for (Py_ssize_t k = 0; k < n; k++)
        ring[(d->avail_idx + k) & mask] = heads[k];
    d->avail_idx = (d->avail_idx + (long)n) & 0xFFFF;
    if (publish)
        __atomic_store_n((uint16_t *)((unsigned char *)d->avail.buf + 2), (uint16_t)d->avail_idx, __ATOMIC_RELEASE);
    return set_long_attr(d->q, "avail_idx", d->avail_idx);
}

/* How many RX buffers ahead receive asks for (the device wrote them from another CPU: a first
 * load is a cache miss, most of the loop's time when not overlapped). A prefetch is a hint: it
 * never faults and no value is used; every address is a checked slot's. */
#define PREFETCH 8

/* a buffer's header and a short frame: two lines */
static inline void prefetch_frame(const unsigned char *p)
{
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);
}

/* Per-call arrays of a batch: on the stack up to a ring of 256, else allocated. */
#define SMALL_BATCH 256
typedef struct {
    PyObject *toks_s[SMALL_BATCH];
    uint32_t lens_s[SMALL_BATCH];
    uint64_t addrs_s[SMALL_BATCH];
    uint16_t heads_s[SMALL_BATCH];
    PyObject **toks;
    uint32_t *lens;
    uint64_t *addrs;
    uint16_t *heads;
} work_t;

static int work_init(work_t *w, Py_ssize_t n)
{
    if (n <= SMALL_BATCH) {
        w->toks = w->toks_s;
        w->lens = w->lens_s;
        w->addrs = w->addrs_s;
        w->heads = w->heads_s;
        return 0;
    }
    w->toks = PyMem_Malloc(sizeof *w->toks * (size_t)n);
    w->lens = PyMem_Malloc(sizeof *w->lens * (size_t)n);
    w->addrs = PyMem_Malloc(sizeof *w->addrs * (size_t)n);
    w->heads = PyMem_Malloc(sizeof *w->heads * (size_t)n);
    if (w->toks == NULL || w->lens == NULL || w->addrs == NULL || w->heads == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void work_done(work_t *w)
{
    if (w->toks != w->toks_s) { /* PyMem_Free(NULL) does nothing: safe whatever work_init got */
        PyMem_Free(w->toks);
        PyMem_Free(w->lens);
        PyMem_Free(w->addrs);
        PyMem_Free(w->heads);
    }
}

/* -- reclaim(q, slots) -> n ------------------------------------------------------------------- */

static PyObject *pk_reclaim(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "reclaim(queue, slots: list)");
        return NULL;
    }
    dq_t d = {0}; /* dq_done is safe on it whatever fails first */
    PyObject *result = NULL;
    work_t w = {.toks = NULL};
    uint64_t taken[32768 / 64];
    if (dq_open(&d, args[0]) < 0 || work_init(&w, d.size) < 0)
        goto out;
    /* DriverQueue.harvest: take, then release, each token appended to `slots` */
    Py_ssize_t n = dq_take_check(&d, w.toks, w.lens, w.heads, d.size, taken);
    if (n >= 0 && dq_take_commit(&d, n) == 0 && dq_release(&d, w.heads, n, args[1]) == 0)
        result = PyLong_FromSsize_t(n);
out:
    work_done(&w);
    dq_done(&d);
    return result;
}

/* -- fill(q, slots, count, bufs, buf_base, buf_size, frame, stamped, want, seq, macs) -> n ---- *
 *   NetFrontend.send_pktgen: the chains the device is done with taken back, those that hold this
 *   very frame (stamped[slot] is want) stamped and posted again in place, the others released to
 *   the free stacks, then free slots for the rest; n frames, seq .. seq + n - 1. */

static int slot_of(PyObject *tok, Py_ssize_t nslots, long *slot)
{
    *slot = PyLong_AsLong(tok);
    if (*slot == -1 && PyErr_Occurred())
        return -1;
    if (*slot < 0 || *slot >= nslots) {
        PyErr_Format(PyExc_IndexError, "buffer slot %ld out of range", *slot);
        return -1;
    }
    return 0;
}

/* a pktgen stamp (seq, length, check) where the frame's payload starts */
static inline void stamp_frame(unsigned char *buf, uint64_t seq, uint32_t size, uint32_t macs)
{
    uint32_t chk = pktgen_check(seq, size, macs);
    memcpy(buf + STAMP_AT, &seq, 8);
    memcpy(buf + STAMP_AT + 8, &size, 4);
    memcpy(buf + STAMP_AT + 12, &chk, 4);
}

static PyObject *pk_fill(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 11 || !PyList_Check(args[1]) || !PyBytes_Check(args[6]) || !PyList_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError,
                        "fill(queue, slots: list, count, bufs, buf_base, buf_size, frame: bytes, stamped: list, "
                        "want, seq, macs)");
        return NULL;
    }
    PyObject *slots = args[1], *frame = args[6], *stamped = args[7], *want = args[8];
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    unsigned long long base = PyLong_AsUnsignedLongLong(args[4]), seq = PyLong_AsUnsignedLongLong(args[9]);
    Py_ssize_t buf_size = PyLong_AsSsize_t(args[5]);
    unsigned long macs = PyLong_AsUnsignedLong(args[10]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t flen = PyBytes_GET_SIZE(frame); /* header and frame */
    if (count < 0 || flen < HDR + PAYLOAD_AT || flen > buf_size || flen - HDR > 0xFFFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "fill: bad count or frame");
        return NULL;
    }
    uint32_t size = (uint32_t)(flen - HDR);
    dq_t d = {0}; /* dq_done is safe on it whatever fails first */
    Py_buffer b = {0};
    int have_b = 0;
    PyObject *result = NULL, *zero = PyLong_FromLong(0);
    work_t w = {.toks = NULL}, f = {.toks = NULL};
    uint16_t *keep = NULL, *drop = NULL;
    long *tslot = NULL;
    uint64_t taken[32768 / 64];
    Py_ssize_t got = 0; /* free slots taken: f.toks[0..got) hold references */
    if (zero == NULL || dq_open(&d, args[0]) < 0 || work_init(&w, d.size) < 0)
        goto out;
    if ((keep = PyMem_Malloc(2 * sizeof *keep * (size_t)d.size)) == NULL ||
        (tslot = PyMem_Malloc(sizeof *tslot * (size_t)d.size)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    drop = keep + d.size;
    uint16_t *heads = w.heads;
    if (PyObject_GetBuffer(args[3], &b, PyBUF_WRITABLE) < 0)
        goto out;
    have_b = 1;
    Py_ssize_t nslots = b.len / buf_size;
    if (PyList_GET_SIZE(stamped) < nslots)
        nslots = PyList_GET_SIZE(stamped);
    unsigned char *area = b.buf;

    /* 1. what the device gave back, every rule checked and every token one of our slots, and what
     * becomes of each; nothing changes until all of it, and the free slots wanted, are checked */
    Py_ssize_t used = dq_take_check(&d, w.toks, w.lens, heads, d.size, taken), nkeep = 0, ndrop = 0;
    if (used < 0)
        goto out;
    for (Py_ssize_t j = 0; j < used; j++)
        if (slot_of(w.toks[j], nslots, &tslot[j]) < 0)
            goto out;
    for (Py_ssize_t j = 0; j < used; j++) {
        /* frontend.py passes one `want` object for every slot it stamps: identity, as the reference */
        if (nkeep < count && PyList_GET_ITEM(stamped, tslot[j]) == want) {
            tslot[nkeep] = tslot[j]; /* nkeep <= j: the kept ones' slots move down in order */
            keep[nkeep++] = heads[j];
        } else {
            drop[ndrop++] = heads[j];
        }
    }
    /* 2. the free slots for the rest: the released ones first (free.pop() takes the last appended),
     * then the list's own, each of those checked before one is popped */
    Py_ssize_t nfree = PyList_GET_SIZE(slots), want_n = count - nkeep;
    if (want_n > nfree + ndrop)
        want_n = nfree + ndrop;
    Py_ssize_t from_list = want_n > ndrop ? want_n - ndrop : 0;
    for (Py_ssize_t t = 0; t < from_list; t++) {
        long slot;
        if (slot_of(PyList_GET_ITEM(slots, nfree - 1 - t), nslots, &slot) < 0)
            goto out; /* not one of ours: nothing taken, nothing stamped */
    }
    if (work_init(&f, want_n) < 0)
        goto out;

    /* 3. commit: the take, the kept chains stamped and posted again, the rest released */
    if (dq_take_commit(&d, used) < 0)
        goto out;
    for (Py_ssize_t k = 0; k < nkeep && k < PREFETCH; k++)
        __builtin_prefetch(area + tslot[k] * buf_size + STAMP_AT, 1);
    for (Py_ssize_t k = 0; k < nkeep; k++) {
        /* the switch read these lines last, from its CPU: asked for, to write, ahead of the stamp */
        if (k + PREFETCH < nkeep)
            __builtin_prefetch(area + tslot[k + PREFETCH] * buf_size + STAMP_AT, 1);
        stamp_frame(area + tslot[k] * buf_size, seq + (uint64_t)k, size, (uint32_t)macs);
    }
    if (dq_release(&d, drop, ndrop, slots) < 0)
        goto out;
    if (nkeep && dq_repost_publish(&d, keep, nkeep, 0) < 0)
        goto out;

    /* 4. slot = free.pop() for the rest, as the pure loop takes them: all taken in one slice (a
     * slice per frame had been a sixth of the simulator's time) */
    nfree = PyList_GET_SIZE(slots);
    for (; got < want_n; got++) {
        PyObject *tok = PyList_GET_ITEM(slots, nfree - 1 - got);
        long slot;
        if (slot_of(tok, nslots, &slot) < 0) /* checked above; a released one is the ring's token */
            goto out;
        Py_INCREF(tok);
        f.toks[got] = tok;
        f.addrs[got] = (uint64_t)slot;
    }
    if (got && PyList_SetSlice(slots, nfree - got, nfree, NULL) < 0)
        goto out;
    uint64_t s0 = seq + (uint64_t)nkeep;
    for (Py_ssize_t k = 0; k < got && k < PREFETCH; k++)
        __builtin_prefetch(area + f.addrs[k] * (uint64_t)buf_size + STAMP_AT, 1);
    for (Py_ssize_t k = 0; k < got; k++) {
        if (k + PREFETCH < got)
            __builtin_prefetch(area + f.addrs[k + PREFETCH] * (uint64_t)buf_size + STAMP_AT, 1);
        long slot = (long)f.addrs[k];
        unsigned char *buf = area + slot * buf_size;
        if (PyList_GET_ITEM(stamped, slot) != want) { /* the whole frame once; afterwards only the stamp */
            memcpy(buf, PyBytes_AS_STRING(frame), (size_t)flen);
            Py_INCREF(want);
            PyList_SetItem(stamped, slot, want);
        }
        stamp_frame(buf, s0 + (uint64_t)k, size, (uint32_t)macs);
        f.addrs[k] = base + (uint64_t)slot * (uint64_t)buf_size;
    }
    if (dq_add_many(&d, f.addrs, (uint32_t)flen, f.toks, got, 0, zero) == 0)
        result = PyLong_FromSsize_t(nkeep + got);
out:
    for (Py_ssize_t k = 0; k < got; k++)
        Py_DECREF(f.toks[k]);
    work_done(&f);
    work_done(&w);
    PyMem_Free(keep);
    PyMem_Free(tslot);
    if (have_b)
        PyBuffer_Release(&b);
    Py_XDECREF(zero);
    dq_done(&d);
    return result;
}

/* -- receive(q, bufs, buf_base, buf_size, mergeable, pattern, seen, take) --------------------- *
 *   -> (frames, received, octets, duplicates, corrupt, quiet): NetFrontend.receive's loop but its
 *   kick, until quiet or a ring's worth of entries was taken (the caller kicks after each call:
 *   kick_needed's 16-bit window, virtio 1.2, 2.7.13, must never span 65536 entries); quiet when
 *   the last take found nothing. */

typedef struct {
    PyObject *seen; /* Receiver.seen: src bytes -> netpacket.SeqSet */
    unsigned char src[6];
    PyObject *set; /* the last sender's SeqSet (owned) */
    uint64_t lo, hi; /* its run [lo, hi), cached while `fast` */
    int fast; /* the run is not empty, its rest is empty and hi + 1 fits: the run is ours to extend */
    int dirty; /* lo, hi changed here and not stored yet */
    long long received, octets, duplicates, corrupt;
    unsigned char macs[12]; /* the last frame's destination and source... */
    uint32_t macs_crc; /* ...and their crc32, the check's input (one sender's frames share it) */
    int have_macs;
} counts_t;

/* The sender's SeqSet's run, read once per sender (and after each SeqSet.add). */
static int seq_load(counts_t *c)
{
    c->fast = 0;
    PyObject *lo = get_attr(c->set, "lo"), *hi = lo ? get_attr(c->set, "hi") : NULL;
    PyObject *rest = hi ? get_attr(c->set, "rest") : NULL;
    int r = -1;
    if (rest != NULL && PyAnySet_Check(rest)) {
        c->lo = PyLong_AsUnsignedLongLong(lo);
        c->hi = c->lo == (uint64_t)-1 && PyErr_Occurred() ? 0 : PyLong_AsUnsignedLongLong(hi);
        if (PyErr_Occurred()) { /* negative or past 64 bits: SeqSet.add takes every frame */
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                goto out;
            PyErr_Clear();
        } else {
            c->fast = c->lo < c->hi && c->hi < UINT64_MAX && PySet_GET_SIZE(rest) == 0;
        }
        r = 0;
    } else if (rest != NULL) {
        PyErr_SetString(PyExc_TypeError, "SeqSet.rest is not a set");
    }
out:
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    Py_XDECREF(rest);
    return r;
}

/* What the fast path moved, back into the SeqSet: before any Python sees it. */
static int seq_store(counts_t *c)
{
    if (!c->dirty)
        return 0;
    PyObject *hi = PyLong_FromUnsignedLongLong(c->hi), *n = attr_name("hi");
    int r = hi != NULL && n != NULL ? PyObject_SetAttr(c->set, n, hi) : -1;
    Py_XDECREF(hi);
    if (r == 0)
        c->dirty = 0; /* else the error path's store tries again */
    return r; /* lo never moves on the fast path: only hi */
}

/* SeqSet.add(seq) on the sender's set, as the reference does it: 1 new, 0 seen, -1 error */
static int seq_add(counts_t *c, uint64_t seq)
{
    if (c->fast) { /* SeqSet.add, the two cases of a non-empty run with nothing in `rest` */
        if (c->lo <= seq && seq < c->hi)
            return 0;
        if (seq == c->hi) {
            c->hi++;
            c->dirty = 1;
            c->fast = c->hi < UINT64_MAX;
            return 1;
        }
    }
    if (seq_store(c) < 0)
        return -1;
    PyObject *sq = PyLong_FromUnsignedLongLong(seq), *n = attr_name("add");
    PyObject *r = sq != NULL && n != NULL ? PyObject_CallMethodOneArg(c->set, n, sq) : NULL;
    Py_XDECREF(sq);
    if (r == NULL)
        return -1;
    int fresh = PyObject_IsTrue(r);
    Py_DECREF(r);
    return fresh < 0 || seq_load(c) < 0 ? -1 : fresh;
}

/* A received frame where the device put it: `count` buffers of the batch (mergeable RX, virtio
 * 1.2, 5.1.6.4), the first after its virtio-net header. Read in place: a 64 KiB frame is 17
 * buffers, and gathering it into one before checking it was a third pass over its bytes. */
typedef struct {
    const unsigned char *area;
    uint64_t base;
    const uint64_t *addrs; /* each a checked slot's address */
    const uint32_t *lens; /* each <= its buffer's length (harvest checked it) */
    Py_ssize_t count;
} frame_t;

static const unsigned char *frame_piece(const frame_t *fr, Py_ssize_t j, size_t *n)
{
    const unsigned char *p = fr->area + (fr->addrs[j] - fr->base);
    size_t w = fr->lens[j];
    if (j > 0) {
        *n = w;
        return p;
    }
    *n = w > HDR ? w - HDR : 0;
    return p + HDR;
}

/* bytes [at, at + n) of the frame (n <= its length) into out, or compared with out: 0 when equal */
static int frame_bytes(const frame_t *fr, size_t at, unsigned char *out, const unsigned char *cmp, size_t n)
{
    for (Py_ssize_t j = 0; j < fr->count && n; j++) {
        size_t len;
        const unsigned char *p = frame_piece(fr, j, &len);
        if (at >= len) {
            at -= len;
            continue;
        }
        size_t k = len - at < n ? len - at : n;
        if (out != NULL)
            memcpy(out, p + at, k);
        else if (memcmp(p + at, cmp, k) != 0)
            return 1;
        out = out != NULL ? out + k : NULL;
        cmp = cmp != NULL ? cmp + k : NULL;
        n -= k;
        at = 0;
    }
    return 0;
}

/* one frame of len >= PAYLOAD_AT bytes, its first PAYLOAD_AT at f: 0 counted, -1 error */
static int take_pktgen(counts_t *c, const frame_t *fr, const unsigned char *f, size_t len, const unsigned char *pat,
                       size_t patlen)
{
    uint64_t seq;
    uint32_t size, chk;
    memcpy(&seq, f + 14, 8);
    memcpy(&size, f + 22, 4);
    memcpy(&chk, f + 26, 4);
    size_t want = size - PAYLOAD_AT < patlen ? size - PAYLOAD_AT : patlen; /* bytes.endswith(pattern[:size-30]) */
    if (!c->have_macs || memcmp(c->macs, f, 12) != 0) {
        memcpy(c->macs, f, 12);
        c->macs_crc = crc32_of(f, 12);
        c->have_macs = 1;
    }
    if (size != len || chk != pktgen_check(seq, size, c->macs_crc) ||
        frame_bytes(fr, len - want, NULL, pat, want) != 0) {
        c->corrupt++;
        return 0;
    }
    if (c->set == NULL || memcmp(c->src, f + 6, 6) != 0) {
        if (c->set != NULL && seq_store(c) < 0)
            return -1;
        PyObject *key = PyBytes_FromStringAndSize((const char *)f + 6, 6);
        if (key == NULL)
            return -1;
        PyObject *s = PyDict_GetItemWithError(c->seen, key);
        if (s == NULL) {
            if (PyErr_Occurred() || (s = PyObject_CallNoArgs(seqset_type)) == NULL ||
                PyDict_SetItem(c->seen, key, s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(key);
                return -1;
            }
            Py_DECREF(s); /* the dict holds it */
        }
        Py_DECREF(key);
        if (!Py_IS_TYPE(s, (PyTypeObject *)seqset_type)) {
            PyErr_SetString(PyExc_TypeError, "Receiver.seen holds something other than a SeqSet");
            return -1;
        }
        Py_INCREF(s);
        Py_XSETREF(c->set, s); /* held: the fallback's Receiver.take may change the dict */
        memcpy(c->src, f + 6, 6);
        if (seq_load(c) < 0)
            return -1;
    }
    int fresh = seq_add(c, seq);
    if (fresh < 0)
        return -1;
    if (fresh) {
        c->received++;
        c->octets += (long long)len;
    } else {
        c->duplicates++;
    }
    return 0;
}

static PyObject *pk_receive(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 8 || !PyBytes_Check(args[5]) || !PyDict_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "receive(queue, bufs, buf_base, buf_size, mergeable, pattern: bytes, seen: dict, take)");
        return NULL;
    }
    unsigned long long base = PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t buf_size = PyLong_AsSsize_t(args[3]);
    int mergeable = PyObject_IsTrue(args[4]);
    if (PyErr_Occurred() || mergeable < 0)
        return NULL;
    if (buf_size <= HDR) {
        PyErr_SetString(PyExc_ValueError, "receive: bad buffer size");
        return NULL;
    }
    const unsigned char *pat = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    size_t patlen = (size_t)PyBytes_GET_SIZE(args[5]);
    counts_t c = {.seen = args[6]};
    dq_t d = {0}; /* dq_done is safe on it whatever fails first */
    Py_buffer b = {0};
    int have_b = 0, quiet = 0;
    PyObject *result = NULL;
    work_t w = {.toks = NULL};
    uint64_t taken[32768 / 64];
    Py_ssize_t frames = 0;
    if (dq_open(&d, args[0]) < 0)
        goto out;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
        goto out;
    have_b = 1;
    Py_ssize_t nslots = b.len / buf_size;
    if (work_init(&w, d.size) < 0)
        goto out;
    PyObject **toks = w.toks;
    uint16_t *heads = w.heads;
    uint32_t *lens = w.lens;
    uint64_t *addrs = w.addrs;
    const unsigned char *area = b.buf;
    /* NetFrontend.receive's loop: take, check, post again, publish, until a take finds nothing */
    for (Py_ssize_t round = 0, entries = 0; entries < d.size; round++) { /* < 2 * size entries a call */
        Py_ssize_t n = dq_take_check(&d, toks, lens, heads, d.size, taken);
        if (n >= 0 && dq_take_commit(&d, n) < 0)
            goto out;
        if (n < 0 && round > 0) { /* what the rounds before counted is returned; the take changed
                                   * nothing, so the next call raises the same error afresh */
            PyErr_Clear();
            break;
        }
        if (n < 0)
            goto out;
        if (n == 0) {
            quiet = 1;
            break;
        }
        entries += n;
        /* every token is one of our slots: checked, all, before any buffer is read (the tokens are
         * borrowed: nothing below runs Python before the last use of them) */
        for (Py_ssize_t k = 0; k < n; k++) {
            long slot;
            if (slot_of(toks[k], nslots, &slot) < 0)
                goto out;
            addrs[k] = base + (uint64_t)slot * (uint64_t)buf_size;
        }
        /* the device wrote these buffers: each asked for PREFETCH ahead of its check */
        for (Py_ssize_t k = 0; k < n && k < PREFETCH; k++)
            prefetch_frame(area + (addrs[k] - base));
        Py_ssize_t i = 0;
        while (i < n) { /* NetFrontend._take: bounded by n, each step consumes at least one entry */
            if (i + PREFETCH < n)
                prefetch_frame(area + (addrs[i + PREFETCH] - base));
            const unsigned char *buf = area + (addrs[i] - base);
            size_t wrote = lens[i]; /* <= the buffer's length: the take checked it against wlens */
            unsigned nbufs = 1;
            if (mergeable)
                nbufs = (unsigned)buf[10] | (unsigned)buf[11] << 8; /* virtio 1.2, 5.1.6.4: num_buffers */
            frame_t fr = {area, base, addrs + i, lens + i, 1};
            size_t flen = wrote > HDR ? wrote - HDR : 0;
            while (fr.count < (Py_ssize_t)nbufs && i + fr.count < n) /* as many as it says, of those used */
                flen += lens[i + fr.count++];
            unsigned char head[PAYLOAD_AT];
            const unsigned char *f = buf + HDR;
            if (flen >= PAYLOAD_AT && wrote < HDR + PAYLOAD_AT) { /* the stamp spans buffers */
                frame_bytes(&fr, 0, head, NULL, PAYLOAD_AT);
                f = head;
            }
            if (flen >= PAYLOAD_AT && f[12] == 0x88 && f[13] == 0xB6) { /* netpacket.PKTGEN_ETHERTYPE */
                if (take_pktgen(&c, &fr, f, flen, pat, patlen) < 0)
                    goto out;
            } else { /* anything else: Receiver.take, the reference (it sees the run stored) */
                if (c.set != NULL && seq_store(&c) < 0)
                    goto out;
                PyObject *fb = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)flen);
                if (fb != NULL)
                    frame_bytes(&fr, 0, (unsigned char *)PyBytes_AS_STRING(fb), NULL, flen);
                PyObject *r = fb ? PyObject_CallOneArg(args[7], fb) : NULL;
                Py_XDECREF(fb);
                if (r == NULL)
                    goto out;
                Py_DECREF(r);
                if (c.set != NULL && seq_load(&c) < 0) /* take may have added to this sender's set */
                    goto out;
            }
            frames++;
            i += fr.count;
        }
        /* every buffer of the batch back to the device as it was, one publish */
        if (dq_repost_publish(&d, heads, n, 1) < 0)
            goto out;
    }
    if (seq_store(&c) < 0)
        goto out;
    result = Py_BuildValue("(nLLLLO)", frames, c.received, c.octets, c.duplicates, c.corrupt,
                           quiet ? Py_True : Py_False);
out:
    if (c.dirty) { /* failed midway: the run as far as it got, as the reference keeps it; its error wins */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (seq_store(&c) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(c.set);
    work_done(&w);
    if (have_b)
        PyBuffer_Release(&b);
    dq_done(&d);
    return result;
}

/* setup(FREE, RingError, SeqSet) */
static PyObject *pk_setup(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 3 || !PyExceptionClass_Check(args[1]) || !PyType_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setup(FREE, RingError, SeqSet)");
        return NULL;
    }
    Py_INCREF(args[2]);
    Py_XSETREF(seqset_type, args[2]);
    Py_INCREF(args[0]);
    Py_XSETREF(free_token, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(ring_error, args[1]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))pk_setup, METH_FASTCALL, "setup(FREE, RingError, SeqSet)"},
    {"reclaim", (PyCFunction)(void (*)(void))pk_reclaim, METH_FASTCALL, "harvest a TX queue into its free slots"},
    {"fill", (PyCFunction)(void (*)(void))pk_fill, METH_FASTCALL, "stamp and add a batch of pktgen frames"},
    {"receive", (PyCFunction)(void (*)(void))pk_receive, METH_FASTCALL, "harvest, check and re-post an RX batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vhostpci_host._pktgen",
    "The simulated driver VM's per-frame ring work, compiled (frontend.py holds the reference).", -1, methods,
};

PyMODINIT_FUNC PyInit__pktgen(void)
{
    crc_init();
    return PyModule_Create(&module);
}
