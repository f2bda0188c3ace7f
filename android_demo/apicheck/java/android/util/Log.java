// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.util;

public final class Log {
    private Log() {}

    public static int i(String tag, String msg) {
        throw new UnsupportedOperationException("declaration only");
    }

    public static int w(String tag, String msg) {
        throw new UnsupportedOperationException("declaration only");
    }
}
