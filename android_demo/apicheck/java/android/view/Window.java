// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: abstract, with many more members (not used by the shell).
package android.view;

public abstract class Window {
    public void addFlags(int flags) {
        throw new UnsupportedOperationException("declaration only");
    }
}
