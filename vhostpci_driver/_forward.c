/*
 * forward_unicast(chains, start, table, source, touched) -> (next, tx_bytes): the net switch's
 * common frame, compiled (apps/forward.py holds the pure reference, which this follows exactly).
 *
 * From chains[start:], in order, while each frame is the simple case, place it: one
 * readable descriptor of at least a virtio-net header and a destination MAC; unicast
 * (the I/G bit clear); the MAC in `table`; that port neither the source nor broken; its
 * next popped RX buffer (rx_bufs[0]) one writable descriptor that holds the frame. The
 * frame is copied into the buffer (num_buffers = 1 with MRG_RXBUF, virtio 1.2, 5.1.6.4),
 * the buffer moves to the port's rx_used, its counters grow, the port joins `touched`.
 * The first frame that is anything else stops the call: Python's policy takes it from
 * there (flood, hold, slow path, drop). Included by _native.c.
 */

#define NET_HDR 12
#define NET_MIN (NET_HDR + 6)

static PyObject *s_broken, *s_rx_bufs, *s_rx_used, *s_mergeable, *s_rx_frames, *s_rx_bytes, *s_popleft;

static int forward_strings(void)
{
    return (s_broken = PyUnicode_InternFromString("broken")) && (s_rx_bufs = PyUnicode_InternFromString("rx_bufs")) &&
                   (s_rx_used = PyUnicode_InternFromString("rx_used")) &&
                   (s_mergeable = PyUnicode_InternFromString("mergeable")) &&
                   (s_rx_frames = PyUnicode_InternFromString("rx_frames")) &&
                   (s_rx_bytes = PyUnicode_InternFromString("rx_bytes")) &&
                   (s_popleft = PyUnicode_InternFromString("popleft"))
               ? 0
               : -1;
}

/* port.<name> += delta */
static int add_counter(PyObject *port, PyObject *name, long long delta)
{
    PyObject *old = PyObject_GetAttr(port, name);
    if (old == NULL)
        return -1;
    PyObject *d = PyLong_FromLongLong(delta), *sum = d ? PyNumber_Add(old, d) : NULL;
    Py_DECREF(old);
    Py_XDECREF(d);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(port, name, sum);
    Py_DECREF(sum);
    return r;
}

typedef struct {
    PyObject *port; /* owned */
    long long frames, bytes;
} tally_t;

static int tally_flush(tally_t *t)
{
    int r = 0;
    if (t->port != NULL && t->frames) {
        if (add_counter(t->port, s_rx_frames, t->frames) < 0 || add_counter(t->port, s_rx_bytes, t->bytes) < 0)
            r = -1;
    }
    Py_CLEAR(t->port);
    t->frames = t->bytes = 0;
    return r;
}

/* 1 placed, 0 not the simple case (stop), -1 error */
static int place_one(PyObject *chain, PyObject *table, PyObject *source, PyObject *touched, tally_t *t,
                     long long *tx_bytes)
{
    if (!PyTuple_Check(chain) || PyTuple_GET_SIZE(chain) != 5)
        return 0;
    PyObject *src_list = PyTuple_GET_ITEM(chain, 1);
    if (!PyList_Check(src_list) || PyList_GET_SIZE(src_list) != 1)
        return 0;
    long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(chain, 3));
    if (size == -1 && PyErr_Occurred())
        return -1;
    if (size < NET_MIN)
        return 0;
    Py_buffer src;
    if (PyObject_GetBuffer(PyList_GET_ITEM(src_list, 0), &src, PyBUF_SIMPLE) < 0)
        return -1;
    int ret = 0;
    PyObject *key = NULL, *bufs = NULL, *buf = NULL, *used = NULL, *merge = NULL, *popped = NULL;
    PyObject *broken = NULL, *entry = NULL, *len_obj = NULL;
    Py_buffer dst = {0};
    int dst_held = 0;
    unsigned char mac[6];
    if (src.len != size)
        goto out;
    memcpy(mac, (unsigned char *)src.buf + NET_HDR, 6); /* the guest may change it: one copy */
    BARRIER();
    if (mac[0] & 1)
        goto out; /* broadcast or multicast: flooded by Python */
    key = PyBytes_FromStringAndSize((const char *)mac, 6);
    if (key == NULL)
        goto fail;
    PyObject *target = PyDict_GetItemWithError(table, key); /* borrowed */
    if (target == NULL) {
        if (PyErr_Occurred())
            goto fail;
        goto out; /* unknown unicast: flooded by Python */
    }
    if (target == source)
        goto out;
    if ((broken = PyObject_GetAttr(target, s_broken)) == NULL)
        goto fail;
    if (broken != Py_None)
        goto out;
    if ((bufs = PyObject_GetAttr(target, s_rx_bufs)) == NULL)
        goto fail;
    Py_ssize_t nb = PyObject_Size(bufs);
    if (nb < 0)
        goto fail;
    if (nb == 0)
        goto out; /* Python pops more RX buffers (or holds the frame) */
    if ((buf = PySequence_GetItem(bufs, 0)) == NULL)
        goto fail;
    if (!PyTuple_Check(buf) || PyTuple_GET_SIZE(buf) != 5)
        goto out;
    PyObject *dst_list = PyTuple_GET_ITEM(buf, 2);
    long long room = PyLong_AsLongLong(PyTuple_GET_ITEM(buf, 4));
    if (room == -1 && PyErr_Occurred())
        goto fail;
    if (room < size || !PyList_Check(dst_list) || PyList_GET_SIZE(dst_list) != 1)
        goto out;
    if (PyObject_GetBuffer(PyList_GET_ITEM(dst_list, 0), &dst, PyBUF_WRITABLE) < 0)
        goto fail;
    dst_held = 1;
    if (dst.len < size)
        goto out;
    if ((merge = PyObject_GetAttr(target, s_mergeable)) == NULL || (used = PyObject_GetAttr(target, s_rx_used)) == NULL)
        goto fail;
    int mergeable = PyObject_IsTrue(merge);
    if (mergeable < 0)
        goto fail;
    /* all checks passed: from here the frame is placed */
    if ((popped = PyObject_CallMethodNoArgs(bufs, s_popleft)) == NULL)
        goto fail;
    memmove(dst.buf, src.buf, (size_t)size); /* memmove: a hostile guest may alias the two */
    if (mergeable) {
        uint16_t one = 1; /* virtio 1.2, 5.1.6.4: num_buffers, le16 (x86 is little-endian) */
        memcpy((unsigned char *)dst.buf + 10, &one, 2);
    }
    if ((len_obj = PyLong_FromLongLong(size)) == NULL ||
        (entry = PyTuple_Pack(2, PyTuple_GET_ITEM(buf, 0), len_obj)) == NULL || PyList_Append(used, entry) < 0 ||
        PySet_Add(touched, target) < 0)
        goto fail;
    if (t->port != target) {
        if (tally_flush(t) < 0)
            goto fail;
        Py_INCREF(target);
        t->port = target;
    }
    t->frames += 1;
    t->bytes += size - NET_HDR;
    *tx_bytes += size;
    ret = 1;
    goto out;
fail:
    ret = -1;
out:
    if (dst_held)
        PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_XDECREF(key);
    Py_XDECREF(broken);
    Py_XDECREF(bufs);
    Py_XDECREF(buf);
    Py_XDECREF(merge);
    Py_XDECREF(used);
    Py_XDECREF(popped);
    Py_XDECREF(entry);
    Py_XDECREF(len_obj);
    return ret;
}

static PyObject *native_forward_unicast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 5 || !PyList_Check(args[0]) || !PyDict_Check(args[2]) || !PySet_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "forward_unicast(chains: list, start, table: dict, source, touched: set)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0)
        i = 0;
    tally_t t = {NULL, 0, 0};
    long long tx_bytes = 0;
    int r = 0;
    /* bounded by the list's length, re-read each time (nothing here can grow it) */
    for (; i < PyList_GET_SIZE(args[0]); i++) {
        r = place_one(PyList_GET_ITEM(args[0], i), args[2], args[3], args[4], &t, &tx_bytes);
        if (r <= 0)
            break;
    }
    if (tally_flush(&t) < 0 || r < 0)
        return NULL;
    return Py_BuildValue("(nL)", i, tx_bytes);
}
