// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.system;

public final class ErrnoException extends Exception {
    public ErrnoException(String functionName, int errno) {
        throw new UnsupportedOperationException("declaration only");
    }
}
