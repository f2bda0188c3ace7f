// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.os;

public final class SystemClock {
    private SystemClock() {}

    public static long elapsedRealtimeNanos() { // native in the real class
        throw new UnsupportedOperationException("declaration only");
    }
}
