// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: implements Parcelable, Cloneable (not used by the shell).
package android.content;

public class Intent {
    public static final int FLAG_ACTIVITY_LAUNCHED_FROM_HISTORY = 0x00100000;

    private Intent() {} // the shell only reads the Intent it was started with

    public String getStringExtra(String name) {
        throw new UnsupportedOperationException("declaration only");
    }

    public int getIntExtra(String name, int defaultValue) {
        throw new UnsupportedOperationException("declaration only");
    }

    public boolean getBooleanExtra(String name, boolean defaultValue) {
        throw new UnsupportedOperationException("declaration only");
    }

    public int getFlags() {
        throw new UnsupportedOperationException("declaration only");
    }
}
