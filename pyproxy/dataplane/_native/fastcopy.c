/* pyproxy._fastcopy: the splice relay's copy step, one read and one write, in C.
 *
 * The pure-Python twin is pyproxy/dataplane/fastcopy.py (`copy_once_py`): same arguments,
 * same answers, and the relay uses whichever is importable. Decisions (when to splice, when to
 * stop reading) stay in Python; this only moves bytes.
 *
 * copy_once(src_fd, dst_fd) -> int
 *   n > 0   n bytes were read from src and all of them written to dst
 *   0       src sent EOF
 *   -1      src had nothing to read (EAGAIN)
 *   -1 - n  n bytes were read, but their tail could not be written yet (dst full):
 *           take_rest() returns that tail (once)
 *   raises OSError on any other error of either socket.
 * The read buffer is this module's own (the event loop is single-threaded).
 *
 * dispatch(epfd, handlers) -> int
 *   one epoll_wait(epfd, timeout 0) for up to MAX_EVENTS events, then handlers[fd](bits) for
 *   each event whose fd is in the dict at that moment (a handler may change the dict); no list
 *   of tuples is built. Returns the number of events; a handler's exception propagates (the
 *   remaining events are level-triggered and come again).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFFER_SIZE (64 * 1024)
static char buffer[BUFFER_SIZE];
static PyObject *rest = NULL;  /* the unsent tail of the last partial write, until taken */

static PyObject *copy_once(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_once(src_fd, dst_fd)");
        return NULL;
    }
    int src = PyLong_AsLong(args[0]);
    int dst = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    ssize_t n;
    do {
        n = recv(src, buffer, BUFFER_SIZE, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyLong_FromLong(-1);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (n == 0)
        return PyLong_FromLong(0);
    ssize_t sent = 0;
    while (sent < n) {
        ssize_t k = send(dst, buffer + sent, (size_t)(n - sent), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sent += k;
    }
    if (sent == n)
        return PyLong_FromSsize_t(n);
    Py_XDECREF(rest);
    rest = PyBytes_FromStringAndSize(buffer + sent, (Py_ssize_t)(n - sent));
    if (rest == NULL)
        return NULL;
    return PyLong_FromSsize_t(-1 - n);
}

static PyObject *take_rest(PyObject *self, PyObject *unused) {
    if (rest == NULL)
        return PyBytes_FromStringAndSize(NULL, 0);
    PyObject *out = rest;
    rest = NULL;
    return out;
}

#define MAX_EVENTS 256

static PyObject *dispatch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "dispatch(epfd, handlers: dict)");
        return NULL;
    }
    int epfd = PyLong_AsLong(args[0]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *handlers = args[1];
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(epfd, events, MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int i = 0; i < n; i++) {
        PyObject *key = PyLong_FromLong(events[i].data.fd);
        if (key == NULL)
            return NULL;
        PyObject *handler = PyDict_GetItemWithError(handlers, key);
        Py_DECREF(key);
        if (handler == NULL) {
            if (PyErr_Occurred())
                return NULL;
            continue;
        }
        Py_INCREF(handler);
        PyObject *bits = PyLong_FromUnsignedLong(events[i].events);
        PyObject *result = bits == NULL ? NULL : PyObject_CallOneArg(handler, bits);
        Py_XDECREF(bits);
        Py_DECREF(handler);
        if (result == NULL)
            return NULL;
        Py_DECREF(result);
    }
    return PyLong_FromLong(n);
}

static PyMethodDef methods[] = {
    {"dispatch", (PyCFunction)(void (*)(void))dispatch, METH_FASTCALL, "epoll_wait once, call the handlers"},
    {"copy_once", (PyCFunction)(void (*)(void))copy_once, METH_FASTCALL, "one read from src, written to dst"},
    {"take_rest", take_rest, METH_NOARGS, "the unsent tail of the last partial copy"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcopy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastcopy(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "BUFFER_SIZE", BUFFER_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
