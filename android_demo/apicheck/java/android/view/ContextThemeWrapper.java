// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.view;

import android.content.ContextWrapper;

public class ContextThemeWrapper extends ContextWrapper {
    public ContextThemeWrapper() {
        super(null);
        throw new UnsupportedOperationException("declaration only");
    }
}
