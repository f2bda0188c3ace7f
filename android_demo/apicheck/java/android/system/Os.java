// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.system;

public final class Os {
    private Os() {}

    public static void setenv(String name, String value, boolean overwrite) throws ErrnoException { // API 21
        throw new UnsupportedOperationException("declaration only");
    }
}
