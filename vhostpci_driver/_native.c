/*
 * vhostpci_driver._native: the device side of a split virtqueue, compiled.
 *
 * The same rules as vhostpci_driver/virtqueue/device.py (the reference), with
 * the same rule names and indexes in its errors, one call per batch:
 *
 *   pop(...)          pop a batch of chains: every descriptor read once into
 *                     locals, every rule of DeviceQueue._walk, buffers
 *                     translated through the region table (memory.py);
 *   push(...)         validate and store a batch of used elements, then the used
 *                     index in one 16-bit store;
 *   need_notify(...)  the event-index decision (virtio 1.2, 2.7.10);
 *   forward_unicast(...)  the net switch's common frame: a run of unicast frames copied
 *                     into their ports' RX buffers (_forward.c; apps/forward.py is the reference).
 *
 * Everything in the rings and descriptors is written by the driver VM, which
 * we do not trust and which writes concurrently: each value is loaded once
 * (READ_ONCE below) and only the local copy is checked and used. Indexes are
 * masked or checked against the ring size before they address anything; every
 * loop is bounded by the ring size or by the caller's batch size.
 *
 * A broken rule is not raised here: the functions return (rule, message, index)
 * and the Python wrapper raises RingError through DeviceQueue._break, so both
 * paths mark the queue broken in exactly one place. Anything else (a Python
 * exception from a GuestMemory that is not the region table) is returned as
 * the exception object, after the state of the chains already popped is kept.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define AVAIL_F_NO_INTERRUPT 1u
#define MAX_CHAIN_BYTES (1ull << 32)
#define MAX_SIZE 32768

/* A compiler barrier: after it, nothing read from shared memory is assumed unchanged, so a
 * local copy made before it is a copy, never re-read (Linux READ_ONCE semantics). */
#define BARRIER() __asm__ __volatile__("" ::: "memory")

static inline uint16_t load16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint16_t load16_acquire(const unsigned char *p)
{
    /* the avail index: later loads of the ring entries must not pass it (virtio_rmb) */
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
} desc_t;

static inline desc_t read_desc(const unsigned char *p)
{
    desc_t d;
    memcpy(&d, p, sizeof d); /* may be unaligned (an indirect table at any address) */
    BARRIER();
    return d;
}

/* -- set by setup() ------------------------------------------------------------------------ */

static PyTypeObject *chain_type;      /* virtqueue.device.Chain (a tuple subclass) */
static PyObject *remote_memory_error; /* errors.RemoteMemoryError */
static PyObject *str_view;            /* "view" */

/* -- errors -------------------------------------------------------------------------------- */

/* The (rule, message, index) triple the Python wrapper turns into a RingError. */
static PyObject *rule_error(const char *rule, PyObject *message, PyObject *index)
{
    if (message == NULL)
        return NULL;
    PyObject *t = Py_BuildValue("(sOO)", rule, message, index ? index : Py_None);
    Py_DECREF(message);
    return t;
}

static PyObject *rule_error_i(const char *rule, PyObject *message, long long index)
{
    PyObject *i = PyLong_FromLongLong(index);
    if (i == NULL) {
        Py_XDECREF(message);
        return NULL;
    }
    PyObject *t = rule_error(rule, message, i);
    Py_DECREF(i);
    return t;
}

/* How many chains to pop now: the driver's avail idx (read once, with acquire: the
 * entries it covers are read after it, virtio 1.2, 2.7.13.3) less ours, at most
 * max_chains (none if that is negative). An idx more than a ring ahead breaks the "avail-idx" rule: returns -1
 * with *err the rule error (or NULL with a Python error set). */
static long avail_pending(const unsigned char *avail, long last, Py_ssize_t size, Py_ssize_t max_chains,
                          PyObject **err)
{
    uint16_t idx = load16_acquire(avail + 2);
    long n = (uint16_t)(idx - (uint16_t)last);
    if (n > size) {
        *err = rule_error("avail-idx",
                          PyUnicode_FromFormat("avail idx moved %ld entries past ours, ring holds %zd", n, size),
                          NULL);
        return -1;
    }
    if (max_chains < 0)
        max_chains = 0;
    return max_chains < n ? (long)max_chains : n;
}


static PyObject *fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* -- translation: memory.py's RegionTable.view, or any GuestMemory's view() ----------------- */

typedef struct {
    PyObject *starts; /* RegionTable._starts (sorted xgpa), or NULL: call mem.view() */
    PyObject *views;  /* RegionTable._views, one memoryview per region */
    PyObject *mem;
    PyObject *hit;    /* the last region hit (owned), as the table's one-entry cache */
    uint64_t hit_start, hit_size;
    Py_ssize_t hit_index; /* the hit region's place in the table (pop_direct reports it) */
} xlate_t;

static void xlate_done(xlate_t *x) { Py_CLEAR(x->hit); }

/* Find the region holding addr (bisect_right(starts, addr) - 1); 1 found, 0 not, -1 error. */
static int region_of(xlate_t *x, uint64_t addr)
{
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(x->starts);
    if (PyList_GET_SIZE(x->views) != hi) {
        PyErr_SetString(PyExc_ValueError, "region table: starts and views differ in length");
        return -1;
    }
    while (lo < hi) { /* bounded: log2 of the table's length */
        Py_ssize_t mid = lo + (hi - lo) / 2;
        unsigned long long s = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(x->starts, mid));
        if (s == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        if (addr < s)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0)
        return 0;
    PyObject *v = PyList_GET_ITEM(x->views, lo - 1);
    if (!PyMemoryView_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "region table: a region's view is not a memoryview");
        return -1;
    }
    const Py_buffer *vb = PyMemoryView_GET_BUFFER(v);
    if (vb->ndim != 1 || vb->itemsize != 1 || vb->strides == NULL || vb->strides[0] != 1 || vb->suboffsets != NULL) {
        PyErr_SetString(PyExc_TypeError, "region table: a region's view is not contiguous bytes");
        return -1;
    }
    Py_ssize_t n = vb->len;
    unsigned long long s = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(x->starts, lo - 1));
    if (s == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    Py_INCREF(v);
    Py_XSETREF(x->hit, v);
    x->hit_start = s;
    x->hit_index = lo - 1;
    x->hit_size = (uint64_t)n;
    return 1;
}

/* region[off:off + len] of a region's view (1-D contiguous bytes: region_of checked it), made as
 * memoryview slicing makes it (a view registered with the same managed buffer, so the region's
 * memory stays alive as long as it does, then narrowed) without a slice object per buffer.
 * The caller has checked that off + len lies inside the view. */
static PyObject *subview(PyObject *region, Py_ssize_t off, Py_ssize_t len)
{
    PyObject *v = PyMemoryView_FromObject(region);
    if (v == NULL)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(v);
    b->buf = (char *)b->buf + off;
    b->len = len;
    b->shape[0] = len; /* itemsize 1, stride 1: still C- and Fortran-contiguous */
    return v;
}

/* Make x->hit the region table's region that holds len bytes at addr (the range must lie in one
 * region, protocol.md 5.3, checked without overflowing 64 bits).  0: found; 1: not mapped, *msg
 * is RegionTable.view's RemoteMemoryError text; -1: a Python error is set. */
static int xlate_find(xlate_t *x, uint64_t addr, uint64_t len, PyObject **msg)
{
    *msg = NULL;
    if (x->hit != NULL && addr >= x->hit_start && addr - x->hit_start <= x->hit_size &&
        len <= x->hit_size - (addr - x->hit_start))
        return 0;
    int found = region_of(x, addr);
    if (found < 0)
        return -1;
    if (!found || addr - x->hit_start > x->hit_size || len > x->hit_size - (addr - x->hit_start)) {
        char text[128];
        snprintf(text, sizeof text, "driver-VM range 0x%llx+0x%llx is not inside one mapped region",
                 (unsigned long long)addr, (unsigned long long)len);
        *msg = PyUnicode_FromString(text);
        return *msg ? 1 : -1;
    }
    return 0;
}

/* len bytes at driver-VM address addr.  0: *out is a new memoryview (a slice of the region's
 * view, as RegionTable.view makes it); 1: not mapped, *msg is the RemoteMemoryError's text;
 * -1: a Python error is set. */
static int xlate_view(xlate_t *x, uint64_t addr, uint64_t len, PyObject **out, PyObject **msg)
{
    *out = NULL;
    *msg = NULL;
    if (x->starts == NULL) {
        PyObject *a = PyLong_FromUnsignedLongLong(addr);
        PyObject *l = a ? PyLong_FromUnsignedLongLong(len) : NULL;
        PyObject *r = l ? PyObject_CallMethodObjArgs(x->mem, str_view, a, l, NULL) : NULL;
        Py_XDECREF(a);
        Py_XDECREF(l);
        if (r != NULL) {
            *out = r;
            return 0;
        }
        if (!PyErr_ExceptionMatches(remote_memory_error))
            return -1;
        PyObject *e = fetch_exception();
        *msg = PyObject_Str(e);
        Py_DECREF(e);
        return *msg ? 1 : -1;
    }
    int t = xlate_find(x, addr, len, msg);
    if (t != 0)
        return t;
    *out = subview(x->hit, (Py_ssize_t)(addr - x->hit_start), (Py_ssize_t)len);
    return *out ? 0 : -1;
}

/* -- buffers ------------------------------------------------------------------------------- */

static int get_buffer(PyObject *obj, Py_buffer *b, int writable, Py_ssize_t need, const char *what)
{
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* The in-flight table: an array('q') of `size` items, -1 free, else the chain's writable bytes. */
static int get_inflight(PyObject *obj, Py_buffer *b, Py_ssize_t size)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (b->itemsize != 8 || b->len != 8 * size || b->format == NULL || strcmp(b->format, "q") != 0) {
        PyErr_SetString(PyExc_TypeError, "in-flight table must be an array('q') of the ring's size");
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static int as_size(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 1 || v > MAX_SIZE || (v & (v - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two <= 32768");
        return -1;
    }
    *out = v;
    return 0;
}

/* -- chains -------------------------------------------------------------------------------- */

/* One int object per batch for a length seen before in it (a ring's buffers are mostly of
 * one size): ints are immutable, so sharing one is what `x = y` does in Python. */
typedef struct {
    uint64_t value;
    PyObject *obj; /* owned */
} len_cache_t;

static PyObject *len_int(len_cache_t *c, uint64_t v)
{
    if (v < 256)
        return PyLong_FromUnsignedLongLong(v); /* CPython's own small ints */
    if (c->obj == NULL || c->value != v) {
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (o == NULL)
            return NULL;
        Py_XSETREF(c->obj, o);
        c->value = v;
    }
    Py_INCREF(c->obj);
    return c->obj;
}

/* Chain(head, readable, writable, rlen, wlen): a tuple subclass, built as tuple.__new__ does. */
static PyObject *new_chain(len_cache_t *lc, long head, PyObject *readable, PyObject *writable, uint64_t rlen,
                           uint64_t wlen)
{
    PyObject *c = chain_type->tp_alloc(chain_type, 5);
    if (c == NULL) {
        Py_DECREF(readable);
        Py_DECREF(writable);
        return NULL;
    }
    PyTuple_SET_ITEM(c, 1, readable);
    PyTuple_SET_ITEM(c, 2, writable);
    PyObject *h = PyLong_FromLong(head);
    PyObject *r = len_int(lc, rlen), *w = len_int(lc, wlen);
    if (h == NULL || r == NULL || w == NULL) {
        Py_XDECREF(h);
        Py_XDECREF(r);
        Py_XDECREF(w);
        Py_DECREF(c);
        return NULL;
    }
    PyTuple_SET_ITEM(c, 0, h);
    PyTuple_SET_ITEM(c, 3, r);
    PyTuple_SET_ITEM(c, 4, w);
    return c;
}

typedef struct {
    const unsigned char *desc; /* the descriptor table, 16 * size bytes */
    Py_ssize_t size;
    long max_chain_len;
    xlate_t x;
    len_cache_t lens;
} ring_t;

/* Outcome of walking one chain: *chain set (0), a broken rule (*err set, 1), or an error (-1). */
#define WALK_OK 0
#define WALK_RULE 1
#define WALK_ERROR -1

/* A chain of several descriptors, or an indirect one: DeviceQueue._walk, rule for rule.
 * `first` is the head descriptor, already read. */
static int walk(ring_t *r, long head, desc_t first, PyObject **chain, PyObject **err)
{
    const unsigned char *table = r->desc;
    long tsize = (long)r->size, i = head, limit = r->max_chain_len, count = 0;
    int indirect = 0, have = 1, ret = WALK_ERROR;
    Py_buffer tb = {0};
    int tb_held = 0;
    uint64_t rlen = 0, wlen = 0;
    PyObject *readable = PyList_New(0), *writable = PyList_New(0), *buf = NULL, *msg = NULL;
    desc_t d = first;
    if (readable == NULL || writable == NULL)
        goto out;
    for (;;) { /* bounded: count <= limit, and limit is at most the ring size per table */
        count++;
        if (count > limit) {
            *err = rule_error_i("chain-length",
                                PyUnicode_FromFormat("chain from head %ld longer than %ld (a loop?)", head, limit),
                                i);
            ret = WALK_RULE;
            goto out;
        }
        if (!have)
            d = read_desc(table + 16 * i); /* i < tsize: checked below before it is used */
        have = 0;
        if (d.flags & F_INDIRECT) {
            if (indirect) {
                *err = rule_error_i("indirect-nested",
                                    PyUnicode_FromString("indirect descriptor inside an indirect table"), i);
                ret = WALK_RULE;
                goto out;
            }
            if (d.flags & F_NEXT) {
                *err = rule_error_i("indirect-next",
                                    PyUnicode_FromString("INDIRECT together with NEXT (virtio 1.2, 2.7.5.3.1)"), i);
                ret = WALK_RULE;
                goto out;
            }
            if (d.len == 0 || d.len % 16 || d.len / 16 > (uint32_t)r->size) {
                *err = rule_error_i("indirect-len",
                                    PyUnicode_FromFormat("indirect table of %lu bytes", (unsigned long)d.len), i);
                ret = WALK_RULE;
                goto out;
            }
            PyObject *tview;
            int t = xlate_view(&r->x, d.addr, d.len, &tview, &msg);
            if (t < 0)
                goto out;
            if (t > 0) {
                *err = rule_error_i("desc-addr", PyUnicode_FromFormat("indirect table: %U", msg), i);
                ret = WALK_RULE;
                goto out;
            }
            int g = get_buffer(tview, &tb, 0, (Py_ssize_t)d.len, "indirect table");
            Py_DECREF(tview); /* the buffer keeps the memory alive until released */
            if (g < 0)
                goto out;
            tb_held = 1;
            table = tb.buf;
            tsize = (long)(d.len / 16);
            i = 0;
            indirect = 1;
            count = 0;
            limit = tsize;
            continue;
        }
        int t = xlate_view(&r->x, d.addr, d.len, &buf, &msg);
        if (t < 0)
            goto out;
        if (t > 0) {
            Py_INCREF(msg);
            *err = rule_error_i("desc-addr", msg, i);
            ret = WALK_RULE;
            goto out;
        }
        if (d.flags & F_WRITE) {
            if (PyList_Append(writable, buf) < 0)
                goto out;
            wlen += d.len;
        } else {
            if (PyList_GET_SIZE(writable)) {
                *err = rule_error_i("desc-order",
                                    PyUnicode_FromString("device-readable descriptor after a writable one"), i);
                ret = WALK_RULE;
                goto out;
            }
            if (PyList_Append(readable, buf) < 0)
                goto out;
            rlen += d.len;
        }
        Py_CLEAR(buf);
        if (rlen + wlen > MAX_CHAIN_BYTES) {
            *err = rule_error_i("chain-bytes", PyUnicode_FromFormat("chain from head %ld exceeds 4 GiB", head), i);
            ret = WALK_RULE;
            goto out;
        }
        if (!(d.flags & F_NEXT)) {
            *chain = new_chain(&r->lens, head, readable, writable, rlen, wlen);
            readable = writable = NULL;
            ret = *chain ? WALK_OK : WALK_ERROR;
            goto out;
        }
        if ((long)d.next >= tsize) {
            *err = rule_error_i("desc-index",
                                PyUnicode_FromFormat("next %ld >= table size %ld", (long)d.next, tsize), d.next);
            ret = WALK_RULE;
            goto out;
        }
        i = d.next;
    }
out:
    if (ret == WALK_RULE && *err == NULL)
        ret = WALK_ERROR; /* building the error itself failed */
    if (tb_held)
        PyBuffer_Release(&tb);
    Py_XDECREF(buf);
    Py_XDECREF(msg);
    Py_XDECREF(readable);
    Py_XDECREF(writable);
    return ret;
}

/* pop(desc, avail, inflight, starts, views, mem, size, last_avail_idx, max_chain_len, max_chains)
 *   -> (chains, err): err is None, (rule, message, index), or an exception to raise.
 * `starts`/`views` are the region table's lists, or None to translate through mem.view(). */
static PyObject *native_pop(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "pop takes 10 arguments");
        return NULL;
    }
    Py_ssize_t size;
    if (as_size(args[6], &size) < 0)
        return NULL;
    long last = PyLong_AsLong(args[7]), max_chain_len = PyLong_AsLong(args[8]);
    Py_ssize_t max_chains = PyLong_AsSsize_t(args[9]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer d, a, f;
    PyObject *out = NULL, *err = NULL, *result = NULL;
    uint16_t heads_small[64], *heads = heads_small;
    if (get_buffer(args[0], &d, 0, 16 * size, "descriptor table") < 0)
        return NULL;
    if (get_buffer(args[1], &a, 0, 6 + 2 * size, "avail ring") < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    if (get_inflight(args[2], &f, size) < 0) {
        PyBuffer_Release(&d);
        PyBuffer_Release(&a);
        return NULL;
    }
    ring_t r = {d.buf, size, max_chain_len, {NULL, NULL, args[5], NULL, 0, 0, 0}, {0, NULL}};
    if (args[3] != Py_None) {
        if (!PyList_Check(args[3]) || !PyList_Check(args[4])) {
            PyErr_SetString(PyExc_TypeError, "starts and views must be lists");
            goto fail;
        }
        r.x.starts = args[3];
        r.x.views = args[4];
    }
    int64_t *inflight = f.buf;
    const unsigned char *avail = a.buf;
    out = PyList_New(0);
    if (out == NULL)
        goto fail;
    long n = avail_pending(avail, last, size, max_chains, &err);
    if (n < 0) {
        if (err == NULL)
            goto fail;
        goto done;
    }
    if (n == 0)
        goto done;
    if (n > 64 && (heads = PyMem_Malloc(sizeof *heads * (size_t)n)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    long start = last & (long)(size - 1);
    for (long k = 0; k < n; k++) /* the batch's avail entries, read once (the ring may wrap) */
        heads[k] = load16(avail + 4 + 2 * ((start + k) & (long)(size - 1)));
    BARRIER();
    for (long k = 0; k < n; k++) {
        long head = heads[k];
        PyObject *chain = NULL;
        if (head >= size) {
            err = rule_error_i("desc-index", PyUnicode_FromFormat("head %ld >= queue size %zd", head, size), head);
            break;
        }
        if (inflight[head] >= 0) {
            err = rule_error_i("desc-in-flight", PyUnicode_FromFormat("head %ld is already in flight", head), head);
            break;
        }
        desc_t first = read_desc(r.desc + 16 * head); /* read once; only the copy is used */
        if (first.flags & (F_NEXT | F_INDIRECT)) {
            int w = walk(&r, head, first, &chain, &err);
            if (w == WALK_ERROR)
                break;
            if (w == WALK_RULE)
                break;
        } else {
            PyObject *buf, *msg;
            int t = xlate_view(&r.x, first.addr, first.len, &buf, &msg);
            if (t < 0)
                break;
            if (t > 0) {
                err = rule_error_i("desc-addr", msg, head);
                break;
            }
            PyObject *one = PyList_New(1), *none = PyList_New(0);
            if (one == NULL || none == NULL) {
                Py_DECREF(buf);
                Py_XDECREF(one);
                Py_XDECREF(none);
                break;
            }
            PyList_SET_ITEM(one, 0, buf);
            if (first.flags & F_WRITE)
                chain = new_chain(&r.lens, head, none, one, 0, first.len);
            else
                chain = new_chain(&r.lens, head, one, none, first.len, 0);
            if (chain == NULL)
                break;
        }
        inflight[head] = (int64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(chain, 4)); /* writable bytes */
        int app = PyList_Append(out, chain);
        Py_DECREF(chain);
        if (app < 0)
            break;
    }
    if (err == NULL && PyErr_Occurred())
        err = fetch_exception(); /* the wrapper raises it after keeping what was popped */
done:
    result = Py_BuildValue("(OO)", out, err ? err : Py_None);
fail:
    if (heads != heads_small)
        PyMem_Free(heads);
    Py_XDECREF(out);
    Py_XDECREF(err);
    xlate_done(&r.x);
    Py_XDECREF(r.lens.obj);
    PyBuffer_Release(&d);
    PyBuffer_Release(&a);
    PyBuffer_Release(&f);
    return result;
}

/* Store m checked (id, len) pairs as used elements after last_used_idx; returns the new used index. */
static long store_used(unsigned char *used, Py_ssize_t size, long last, const uint32_t *words, Py_ssize_t m)
{
    /* virtio 1.2, 2.7.8: the elements first, then the index that publishes them */
    for (Py_ssize_t k = 0; k < m; k++) {
        unsigned char *elem = used + 4 + 8 * ((last + k) & (long)(size - 1));
        memcpy(elem, &words[2 * k], 8);
    }
    uint16_t idx = (uint16_t)(last + m);
    /* One 16-bit store, ordered after the elements (virtio_wmb): a guest may read the index at
     * any moment, and must never see a half-written one (no zero-fill-then-write). */
    __atomic_store_n((uint16_t *)(used + 2), idx, __ATOMIC_RELEASE);
    return idx;
}

/* The used-id and used-len rules for one entry (DeviceQueue.push_batch): NULL when it may be
 * stored (and it is no longer in flight), else (rule, message, index), or NULL with an error set. */
static PyObject *check_used(int64_t *inflight, Py_ssize_t size, long long h, long long w, int *ok)
{
    *ok = 0;
    if (h < 0 || h >= size || inflight[h] < 0)
        return rule_error_i("used-id", PyUnicode_FromFormat("head %lld is not in flight", h), h);
    if (w < 0 || w > inflight[h])
        return rule_error_i(
            "used-len",
            PyUnicode_FromFormat("%lld bytes written, chain has %lld writable", w, (long long)inflight[h]), h);
    inflight[h] = -1;
    *ok = 1;
    return NULL;
}

/* push(used, inflight, entries, size, last_used_idx) -> the new used index, or (rule, message, index).
 * Entries are checked in order; an entry that breaks a rule stores nothing (the ones before it
 * are no longer in flight, as in DeviceQueue.push_batch). */
static PyObject *native_push(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "push takes 5 arguments");
        return NULL;
    }
    Py_ssize_t size;
    if (as_size(args[3], &size) < 0)
        return NULL;
    long last = PyLong_AsLong(args[4]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "used entries must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    Py_buffer u, f;
    PyObject *result = NULL;
    uint32_t small[128], *words = small;
    if (get_buffer(args[0], &u, 1, 6 + 8 * size, "used ring") < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    if (get_inflight(args[1], &f, size) < 0) {
        PyBuffer_Release(&u);
        Py_DECREF(seq);
        return NULL;
    }
    int64_t *inflight = f.buf;
    Py_ssize_t k;
    if (m > size) /* at most `size` heads are in flight: entry size + 1 fails at the latest */
        m = size + 1;
    if (2 * m > (Py_ssize_t)(sizeof small / sizeof *small) &&
        (words = PyMem_Malloc(sizeof *words * 2 * (size_t)m)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (k = 0; k < m; k++) {
        PyObject *e = PySequence_Fast_GET_ITEM(seq, k);
        PyObject *pair = PySequence_Fast(e, "a used entry must be (head, written)");
        if (pair == NULL)
            goto out;
        if (PySequence_Fast_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_ValueError, "a used entry must be (head, written)");
            Py_DECREF(pair);
            goto out;
        }
        PyObject *ho = PySequence_Fast_GET_ITEM(pair, 0), *wo = PySequence_Fast_GET_ITEM(pair, 1);
        if (!PyLong_Check(ho) || !PyLong_Check(wo)) {
            PyErr_SetString(PyExc_TypeError, "a used entry's head and length must be integers");
            Py_DECREF(pair);
            goto out;
        }
        int over;
        long long h = PyLong_AsLongLongAndOverflow(ho, &over);
        if (over || h < 0 || h >= size || inflight[h] < 0) {
            result = rule_error("used-id", PyUnicode_FromFormat("head %S is not in flight", ho), ho);
            Py_DECREF(pair);
            goto out;
        }
        long long w = PyLong_AsLongLongAndOverflow(wo, &over);
        if (over || w < 0 || w > inflight[h]) {
            result = rule_error("used-len",
                                PyUnicode_FromFormat("%S bytes written, chain has %lld writable", wo,
                                                     (long long)inflight[h]),
                                ho);
            Py_DECREF(pair);
            goto out;
        }
        Py_DECREF(pair);
        inflight[h] = -1;
        words[2 * k] = (uint32_t)h;
        words[2 * k + 1] = (uint32_t)w;
    }
    if (m == 0) {
        result = PyLong_FromLong(last & 0xFFFF);
        goto out;
    }
    result = PyLong_FromLong(store_used(u.buf, size, last, words, m));
out:
    if (words != small)
        PyMem_Free(words);
    PyBuffer_Release(&u);
    PyBuffer_Release(&f);
    Py_DECREF(seq);
    return result;
}

/* pop_direct(desc, avail, inflight, starts, views, size, last_avail_idx, max_chains, out) -> (n, err):
 * DeviceQueue.pop_direct, the batch without an object per chain. out is an array('Q'): chain k
 * is head | writable << 16 | len << 32, the region's index, the offset in the region's view. */
static PyObject *native_pop_direct(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 9 || !PyList_Check(args[3]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "pop_direct takes 9 arguments, starts and views lists");
        return NULL;
    }
    Py_ssize_t size;
    if (as_size(args[5], &size) < 0)
        return NULL;
    long last = PyLong_AsLong(args[6]);
    Py_ssize_t max_chains = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer d, a, f, o;
    if (get_buffer(args[0], &d, 0, 16 * size, "descriptor table") < 0)
        return NULL;
    if (get_buffer(args[1], &a, 0, 6 + 2 * size, "avail ring") < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    if (get_inflight(args[2], &f, size) < 0) {
        PyBuffer_Release(&d);
        PyBuffer_Release(&a);
        return NULL;
    }
    if (PyObject_GetBuffer(args[8], &o, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&d);
        PyBuffer_Release(&a);
        PyBuffer_Release(&f);
        return NULL;
    }
    xlate_t x = {args[3], args[4], NULL, NULL, 0, 0, 0};
    PyObject *err = NULL, *result = NULL, *msg = NULL;
    long popped = 0;
    int64_t *inflight = f.buf;
    uint64_t *out = o.buf;
    const unsigned char *avail = a.buf, *table = d.buf;
    if (o.itemsize != 8 || o.format == NULL || strcmp(o.format, "Q") != 0) {
        PyErr_SetString(PyExc_TypeError, "pop_direct: out must be an array('Q')");
        goto fail;
    }
    long n = avail_pending(avail, last, size, max_chains, &err);
    if (n < 0) {
        if (err == NULL)
            goto fail;
        goto done;
    }
    if (o.len / 8 < 3 * (Py_ssize_t)n) {
        PyErr_Format(PyExc_ValueError, "pop_direct: %zd words cannot describe %ld chains", o.len / 8, n);
        goto fail;
    }
    long start = last & (long)(size - 1);
    for (long k = 0; k < n; k++) {
        /* each avail entry read once, in order (the ring may wrap): nothing is re-read later */
        long head = load16(avail + 4 + 2 * ((start + k) & (long)(size - 1)));
        BARRIER();
        if (head >= size) {
            err = rule_error_i("desc-index", PyUnicode_FromFormat("head %ld >= queue size %zd", head, size), head);
            break;
        }
        if (inflight[head] >= 0) {
            err = rule_error_i("desc-in-flight", PyUnicode_FromFormat("head %ld is already in flight", head), head);
            break;
        }
        desc_t one = read_desc(table + 16 * head); /* read once; only the copy is used */
        if (one.flags & (F_NEXT | F_INDIRECT))
            break; /* not popped: pop_batch walks it */
        int t = xlate_find(&x, one.addr, one.len, &msg);
        if (t < 0)
            break;
        if (t > 0) {
            err = rule_error_i("desc-addr", msg, head);
            msg = NULL;
            break;
        }
        int writable = (one.flags & F_WRITE) != 0;
        out[3 * popped] = (uint64_t)head | (uint64_t)writable << 16 | (uint64_t)one.len << 32;
        out[3 * popped + 1] = (uint64_t)x.hit_index;
        out[3 * popped + 2] = one.addr - x.hit_start;
        inflight[head] = writable ? (int64_t)one.len : 0;
        popped++;
    }
    if (err == NULL && PyErr_Occurred())
        err = fetch_exception(); /* the wrapper raises it after keeping what was popped */
done:
    result = Py_BuildValue("(lO)", popped, err ? err : Py_None);
fail:
    Py_XDECREF(err);
    Py_XDECREF(msg);
    xlate_done(&x);
    PyBuffer_Release(&d);
    PyBuffer_Release(&a);
    PyBuffer_Release(&f);
    PyBuffer_Release(&o);
    return result;
}

/* push_direct(used, inflight, words, n, size, last_used_idx) -> the new used index, or (rule,
 * message, index): DeviceQueue.push_direct, entry k being words[2k] (head), words[2k + 1] (len). */
static PyObject *native_push_direct(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "push_direct takes 6 arguments");
        return NULL;
    }
    Py_ssize_t size, n = PyLong_AsSsize_t(args[3]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (as_size(args[4], &size) < 0)
        return NULL;
    long last = PyLong_AsLong(args[5]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer u, f, w;
    PyObject *result = NULL;
    if (get_buffer(args[0], &u, 1, 6 + 8 * size, "used ring") < 0)
        return NULL;
    if (get_inflight(args[1], &f, size) < 0) {
        PyBuffer_Release(&u);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &w, PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&u);
        PyBuffer_Release(&f);
        return NULL;
    }
    const uint32_t *words = w.buf;
    if (w.itemsize != 4 || w.format == NULL || strcmp(w.format, "I") != 0) {
        PyErr_SetString(PyExc_TypeError, "push_direct: the entries must be an array('I')");
        goto out;
    }
    if (n < 0 || n > w.len / 8) {
        PyErr_Format(PyExc_ValueError, "push_direct: %zd words cannot hold %zd used entries", w.len / 4, n);
        goto out;
    }
    uint32_t small[128], *checked = small;
    Py_ssize_t m = n > size ? size + 1 : n; /* at most `size` in flight: entry size + 1 fails at the latest */
    if (2 * m > (Py_ssize_t)(sizeof small / sizeof *small) &&
        (checked = PyMem_Malloc(sizeof *checked * 2 * (size_t)m)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    Py_ssize_t k;
    for (k = 0; k < m; k++) {
        uint32_t h = words[2 * k], len = words[2 * k + 1]; /* ours (the app's), read once all the same */
        int ok;
        result = check_used(f.buf, size, h, len, &ok);
        if (!ok)
            break;
        checked[2 * k] = h;
        checked[2 * k + 1] = len;
    }
    if (k == m)
        result = PyLong_FromLong(m ? store_used(u.buf, size, last, checked, m) : (last & 0xFFFF));
    if (checked != small)
        PyMem_Free(checked);
out:
    PyBuffer_Release(&u);
    PyBuffer_Release(&f);
    PyBuffer_Release(&w);
    return result;
}

/* need_notify(avail, size, event_idx, old, new) -> bool: virtio 1.2, 2.7.10. */
static PyObject *native_need_notify(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "need_notify takes 5 arguments");
        return NULL;
    }
    Py_ssize_t size;
    if (as_size(args[1], &size) < 0)
        return NULL;
    int event_idx = PyObject_IsTrue(args[2]);
    long old = PyLong_AsLong(args[3]), new = PyLong_AsLong(args[4]);
    if (event_idx < 0 || PyErr_Occurred())
        return NULL;
    Py_buffer a;
    if (get_buffer(args[0], &a, 0, 6 + 2 * size, "avail ring") < 0)
        return NULL;
    /* our used-index store before the driver's flags / used_event load (virtio_mb) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int notify;
    if (event_idx) {
        uint16_t event = load16((const unsigned char *)a.buf + 4 + 2 * size);
        notify = (uint16_t)(new - event - 1) < (uint16_t)(new - old);
    } else {
        notify = !(load16(a.buf) & AVAIL_F_NO_INTERRUPT);
    }
    PyBuffer_Release(&a);
    return PyBool_FromLong(notify);
}

/* setup(Chain, RemoteMemoryError): the Python types this module builds and recognises. */
static PyObject *native_setup(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 2 || !PyType_Check(args[0]) || !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type) ||
        !PyExceptionClass_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup(Chain, RemoteMemoryError)");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(chain_type, (PyTypeObject *)args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(remote_memory_error, args[1]);
    Py_RETURN_NONE;
}


#include "_forward.c"

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))native_setup, METH_FASTCALL, "setup(Chain, RemoteMemoryError)"},
    {"pop", (PyCFunction)(void (*)(void))native_pop, METH_FASTCALL, "pop a batch of chains"},
    {"push", (PyCFunction)(void (*)(void))native_push, METH_FASTCALL, "push a batch of used elements"},
    {"pop_direct", (PyCFunction)(void (*)(void))native_pop_direct, METH_FASTCALL,
     "pop a run of direct single-descriptor chains into an array"},
    {"push_direct", (PyCFunction)(void (*)(void))native_push_direct, METH_FASTCALL,
     "push used elements given as an array of words"},
    {"need_notify", (PyCFunction)(void (*)(void))native_need_notify, METH_FASTCALL, "the event-index decision"},
    {"forward_unicast", (PyCFunction)(void (*)(void))native_forward_unicast, METH_FASTCALL,
     "place a run of unicast frames into their ports' RX buffers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vhostpci_driver._native",
    "The device side of split virtqueues, compiled (virtqueue/device.py is the reference).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    str_view = PyUnicode_InternFromString("view");
    if (str_view == NULL || forward_strings() < 0)
        return NULL;
    return PyModule_Create(&module);
}
