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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
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

static PyMethodDef methods[] = {
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
